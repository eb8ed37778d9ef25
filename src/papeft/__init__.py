"""papeft: prompt-aware representation adjustment (PARADE, PARA, PEDRO), LoPA and PEFT baselines."""

__version__ = "0.1.0"
