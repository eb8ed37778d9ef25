"""Entry point: `python run.py [backbone=...] [method=...] [task=...] [trainer=...] [seed=0..4]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works before `pip install -e .` too

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from papeft.runner.cells import run
    run(cfg)


if __name__ == "__main__":
    main()
