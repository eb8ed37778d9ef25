"""LLM-as-a-judge for MT-Bench: the PARADE Appendix D review prompt, two backends, score parsing.

`Judge.score(question, answer, reference=None)` returns a score out of 10, or None when the judge's
reply holds no readable score (a missing score, never a 0). Backends only turn prompts into replies:

* `LocalJudge`   any backbone config (`papeft.backbone.loading.load_backbone`), greedy decoding through
                 the backbone's chat template (`PromptFormatter`); works offline;
* `OpenAIJudge`  an OpenAI-compatible chat-completions endpoint over HTTP (stdlib urllib): base_url,
                 model, API key from an environment variable, timeout, retries. The paper used GPT-4.

Our readings (the paper is silent):
* Appendix D grades two responses side by side. A run has one model's answers, so `score()` uses
  the same prompt adapted to one response (`SINGLE_TEMPLATE`); where MT-Bench has a GPT-4
  reference answer it is shown to the judge as a reference, as MT-Bench's own single grading does.
  The paper's two-response prompt is kept verbatim (`PAIRWISE_TEMPLATE`, `score_pair`) to compare
  two runs' answers the paper's way;
* both prompts end with one added line asking for the scores in a fixed form, which parsing
  prefers but does not need;
* a turn-2 answer is judged with the first exchange shown as context in the query;
* parsing accepts scores from 0 to 10; "x/y" and "x out of y" are rescaled to 10 (4/5 -> 8).
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence


PAIRWISE_TEMPLATE = """Task Introduction
you will be given a query, and two responses from two assistants, could you compare the two responses, and do the following:
(1) write a concise review for each assistant's response, on how well the response answers the query, and whether it will be helpful to humans users, and any issues in the response;
(2) assigns a quantitative score on a scale of 10 to each response, reflecting your assessment of the two responses
Query:
{query}
Response 1 from assistant 1:
{response1}
Response 2 from assistant 2:
{response2}

End with one line of the form "Scores: X Y" (X for response 1, Y for response 2)."""

SINGLE_TEMPLATE = """Task Introduction
you will be given a query, and a response from an assistant, could you do the following:
(1) write a concise review of the assistant's response, on how well the response answers the query, and whether it will be helpful to humans users, and any issues in the response;
(2) assign a quantitative score on a scale of 10 to the response, reflecting your assessment of the response
Query:
{query}
{reference}Response from the assistant:
{response}

End with one line of the form "Score: X/10"."""

REFERENCE_BLOCK = "Reference answer (a correct answer, for your assessment):\n{reference}\n"

NUM = r"(?<![\d.])(\d{1,3}(?:\.\d+)?)(?!\d)"   # 0-999, decimals allowed; never part of a longer number
_LABEL = re.compile(rf"\b(?:score|scores|rating|rated|rate|grade|mark|give\s+(?:it|this|the\s+\w+))\b"
                    rf"(?:(?!scale|out\s+of)[^\d\n]){{0,40}}?{NUM}(?:\s*(?:/|out\s+of)\s*{NUM})?", re.I)
_FRACTION = re.compile(rf"{NUM}\s*(?:/|out\s+of)\s*(10|100|5)\b", re.I)
_BRACKETS = re.compile(rf"\[\[\s*{NUM}\s*(?:/\s*10\s*)?\]\]")
_LINE_END = re.compile(rf"^\s*(?:assistant|response)\s*\d?\s*(?:'s\s+score)?\s*[:=\-]\s*{NUM}"
                       rf"\s*(?:/\s*10)?\s*\.?\s*$", re.I | re.M)
_LONE_NUMBER = re.compile(rf"^\s*{NUM}\s*(?:/\s*10)?\s*\.?\s*$")
_SCALE = re.compile(r"(?:(?:on|using)\s+)?a\s+scale\s+(?:of|from)\s+(?:\d+\s*(?:-|to)\s*)?10\b"
                    r"|(?<=score)\s+out\s+of\s+10\b|(?<=rating)\s+out\s+of\s+10\b", re.I)
_SECOND = re.compile(r"^\W*(?:assistant|response)\s*2\b", re.I | re.M)
_WHO = re.compile(r"\b(?:assistant|response)\s*[12]\b", re.I)


def _in_range(value: float) -> float | None:
    return value if 0.0 <= value <= 10.0 else None


def _scaled(number: str, out_of: str | None) -> float | None:
    value = float(number)
    if out_of is not None and float(out_of) > 0 and float(out_of) != 10:
        value = value * 10.0 / float(out_of)
    return _in_range(value)


def parse_score(text: str | None) -> float | None:
    """The score out of 10 in a judge's free-text reply, or None if there is none.

    Tried in order, the last match of the first kind that has one wins (the verdict comes last):
    "[[8]]"; a labelled score ("Score: 8/10", "I would rate it 7", "Rating - 6.5"); a fraction
    ("8 out of 10", "4/5"); a line "Assistant 1: 7.5"; a last line that is just a number.
    """
    if not text:
        return None
    text = _WHO.sub(lambda m: m.group(0)[:-1].rstrip(), text.replace("*", "").replace("`", ""))
    text = _SCALE.sub(" ", text)
    kinds = [
        [_in_range(float(m.group(1))) for m in _BRACKETS.finditer(text)],
        [_scaled(m.group(1), m.group(2)) for m in _LABEL.finditer(text)],
        [_scaled(m.group(1), m.group(2)) for m in _FRACTION.finditer(text)],
        [_in_range(float(m.group(1))) for m in _LINE_END.finditer(text)],
    ]
    for found in kinds:
        found = [v for v in found if v is not None]
        if found:
            return found[-1]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    lone = _LONE_NUMBER.match(lines[-1]) if lines else None
    return _in_range(float(lone.group(1))) if lone else None


def parse_pair_scores(text: str | None) -> tuple[float | None, float | None]:
    """The two scores of a two-response review: a last line holding exactly two numbers
    ("Scores: 7 8", "7/10, 8/10", "Assistant 1: 7, Assistant 2: 8"), else the score in the text
    before and after the start of the second response's section."""
    if not text:
        return None, None
    text = text.replace("*", "").replace("`", "")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines:
        last = re.sub(r"(?:/|out\s+of)\s*10\b", " ", _WHO.sub(" ", lines[-1]), flags=re.I)
        numbers = re.findall(NUM, last)
        if len(numbers) == 2:
            return _in_range(float(numbers[0])), _in_range(float(numbers[1]))
    second = [m.start() for m in _SECOND.finditer(text)]
    if not second:
        return None, None
    return parse_score(text[:second[0]]), parse_score(text[second[0]:])


def single_prompt(query: str, response: str, reference: str | None = None) -> str:
    """The judge prompt for one response (Appendix D adapted; see the module docstring)."""
    block = REFERENCE_BLOCK.format(reference=reference) if reference else ""
    return SINGLE_TEMPLATE.format(query=query, reference=block, response=response)


def pairwise_prompt(query: str, response1: str, response2: str) -> str:
    """The paper's Appendix D prompt for two responses."""
    return PAIRWISE_TEMPLATE.format(query=query, response1=response1, response2=response2)


class JudgeError(RuntimeError):
    """The judge cannot work at all (bad configuration, rejected credentials): stop the evaluation."""


class Reply(NamedTuple):
    """A judge model's reply text, or why there is none for this prompt (then `text` is "")."""

    text: str
    error: str | None = None


@dataclass(frozen=True)
class Review:
    """One judged answer: the judge's reply, the parsed score (None = missing), any call error."""

    text: str
    score: float | None
    error: str | None = None


class Judge:
    """Base class: subclasses implement `complete(prompts) -> one Reply per prompt`."""

    name = "judge"

    def complete(self, prompts: Sequence[str]) -> list[Reply]:
        raise NotImplementedError

    def review_many(self, items: Sequence[tuple[str, str, str | None]]) -> list[Review]:
        """Review each (question, answer, reference or None) with the single-response prompt."""
        replies = self.complete([single_prompt(q, a, r) for q, a, r in items])
        return [Review(rep.text, parse_score(rep.text), rep.error) for rep in replies]

    def score(self, question: str, answer: str, reference: str | None = None) -> float | None:
        """A score out of 10 for `answer`, or None when the reply holds no readable score."""
        return self.review_many([(question, answer, reference)])[0].score

    def score_pair(self, question: str, answer1: str, answer2: str) -> tuple[float | None, float | None]:
        """The paper's protocol: both answers in one prompt, one score each."""
        return parse_pair_scores(self.complete([pairwise_prompt(question, answer1, answer2)])[0].text)


# ---------------------------------------------------------------------------- local backend



def backbone_config(spec: str | Mapping[str, Any]) -> dict:
    """A backbone config: a mapping as given, or a name read from configs/backbone/NAME.yaml."""
    if isinstance(spec, Mapping):
        return dict(spec)
    from papeft.backbone import loading

    try:
        return loading.backbone_config(spec)
    except FileNotFoundError as exc:
        raise JudgeError(f"judge.backbone={spec!r}: {exc}") from None


def load_backbone(cfg: dict):  # indirection so tests can substitute a tiny model
    from papeft.backbone.loading import load_backbone as load

    return load(cfg)


class LocalJudge(Judge):
    """A judge model run here: greedy decoding, the backbone's chat template, batched prompts."""

    name = "local"

    def __init__(self, backbone: str | Mapping[str, Any], *, max_new_tokens: int = 512, batch_size: int = 4,
                 max_length: int = 4096, device: str = "auto"):
        import torch

        from .prompting import PromptFormatter

        cfg = backbone_config(backbone)
        self.model, self.tok = load_backbone(cfg)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device)
        self.device = device
        self.formatter = PromptFormatter(self.tok, cfg.get("chat_template", "auto"), cfg.get("system_prompt"),
                                         max_length)
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.name = f"local:{cfg.get('name', 'backbone')}"

    def complete(self, prompts: Sequence[str]) -> list[Reply]:
        import torch

        from .prompting import collate_prompts

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        encoded = [self.formatter.encode(p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt))
        out: list[Reply] = [Reply("")] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = {k: v.to(self.device) for k, v in collate_prompts([encoded[i] for i in idx], pad).items()}
            with torch.no_grad():
                gen = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          num_beams=1, pad_token_id=pad, eos_token_id=self.tok.eos_token_id)
            for i, row in zip(idx, gen[:, batch["input_ids"].shape[1]:]):
                out[i] = Reply(self.tok.decode(row.tolist(), skip_special_tokens=True).strip())
        return out


# ---------------------------------------------------------------------------- HTTP backend


class OpenAIJudge(Judge):
    """An OpenAI-compatible `/chat/completions` endpoint; transient failures are retried, then the
    answer's score is recorded as missing; rejected credentials or a bad request stop everything."""

    name = "openai"

    def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 60.0, retries: int = 3,
                 retry_backoff_s: float = 2.0, max_tokens: int = 1024, temperature: float = 0.0):
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise JudgeError(f"the judge's API key is read from the environment variable {api_key_env}, "
                                 f"which is not set; export it, or set judge.api_key_env=null for an endpoint "
                                 f"without keys, or judge.enabled=false to skip the judge")
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.timeout_s, self.retries, self.backoff = float(timeout_s), int(retries), float(retry_backoff_s)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.name = f"openai:{model}"

    def complete(self, prompts: Sequence[str]) -> list[Reply]:
        return [self._complete_one(p) for p in prompts]

    def _complete_one(self, prompt: str) -> Reply:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    data = json.loads(response.read().decode("utf-8"))
                return Reply(str(data["choices"][0]["message"]["content"] or ""))
            except urllib.error.HTTPError as exc:
                if exc.code in (400, 401, 403, 404):
                    raise JudgeError(f"judge endpoint {self.url} answered HTTP {exc.code} ({exc.reason}); check "
                                     f"judge.base_url, judge.model and the API key") from None
                last = f"HTTP {exc.code} {exc.reason}"
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"malformed reply: {type(exc).__name__}: {exc}"
        return Reply("", f"no reply after {self.retries + 1} tries: {last}")


def _key_env(cfg: Mapping[str, Any]) -> str | None:
    return cfg["api_key_env"] if "api_key_env" in cfg else "OPENAI_API_KEY"


def validate_judge_config(cfg: Mapping[str, Any] | None) -> None:
    """Check a `judge` config without loading anything heavy, so that a wrong backend, an unknown
    backbone or a missing API key stops a run before training rather than after it."""
    if cfg is None:
        raise JudgeError("no judge config; choose one with judge=local or judge=openai (or judge.enabled=false)")
    if not cfg.get("enabled", True):
        return
    backend = cfg.get("backend")
    if backend == "local":
        backbone_config(cfg.get("backbone") or "smollm2_135m")
    elif backend == "openai":
        if not cfg.get("model"):
            raise JudgeError("judge.model is empty; set e.g. judge.model=gpt-4")
        env = _key_env(cfg)
        if env and not os.environ.get(env):
            raise JudgeError(f"the judge's API key is read from the environment variable {env}, which is not "
                             f"set; export it, or set judge.api_key_env=null for an endpoint without keys, "
                             f"or judge.enabled=false to skip the judge")
    else:
        raise JudgeError(f"judge.backend={backend!r}; expected local | openai")


def judge_summary(cfg: Mapping[str, Any]) -> str:
    """One sentence for result tables: what the task's score is under this judge config."""
    if not cfg.get("enabled", True):
        return ("judge disabled (judge.enabled=false): the MT-Bench score is ROUGE-L against GPT-4's reference "
                "answers (questions 101-130 only), NOT a judge score as in the paper")
    if cfg.get("backend") == "local":
        spec = cfg.get("backbone") or "smollm2_135m"
        name = spec.get("name", "backbone") if isinstance(spec, Mapping) else spec
        who = f"a local judge model ({name}, greedy decoding)"
    else:
        who = f"{cfg.get('model')} at {cfg.get('base_url', 'https://api.openai.com/v1')}"
    return (f"MT-Bench score = mean judge score out of 10 by {who}, with the Appendix D review prompt adapted to one "
            f"response; unreadable scores are counted as missing, not 0; the paper's judge was GPT-4")


def make_judge(cfg: Mapping[str, Any] | None) -> Judge | None:
    """The judge a `judge` config describes (configs/judge/*.yaml), or None when `enabled: false`."""
    validate_judge_config(cfg)
    cfg = dict(cfg or {})
    if not cfg.get("enabled", True):
        return None
    if cfg["backend"] == "local":
        return LocalJudge(cfg.get("backbone") or "smollm2_135m", max_new_tokens=cfg.get("max_new_tokens", 512),
                          batch_size=cfg.get("batch_size", 4), max_length=cfg.get("max_length", 4096),
                          device=cfg.get("device", "auto"))
    keys = ("base_url", "timeout_s", "retries", "retry_backoff_s", "max_tokens", "temperature")
    return OpenAIJudge(cfg["model"], api_key_env=_key_env(cfg), **{k: cfg[k] for k in keys if k in cfg})
