"""Alpaca -> MT-Bench: data counts, prompts, two-turn evaluation, ROUGE-L, the judge and its parsing."""
import http.server
import json
import string
import threading
import time

import pytest
import torch

from conftest import REPO, TINY
from papeft.tasks import judge as judge_mod
from papeft.backbone.loading import build_random
from papeft.tasks.judge import (Judge, JudgeError, LocalJudge, OpenAIJudge, Reply, make_judge, pairwise_prompt,
                          parse_pair_scores, parse_score, single_prompt)
from papeft.tasks.base import DataError
from papeft.tasks.instruction import (SUBSET_NOTE, InstructionTask, alpaca_prompt, read_json_list,
                                      read_mt_bench)

NO_JUDGE = {"judge": {"enabled": False}}


# ---------------------------------------------------------------------------- data


def test_real_mt_bench_rows_are_counted_exactly(shared_data):
    questions = read_mt_bench(shared_data / "mt_bench")
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    categories = {}
    for q in questions:
        categories[q.category] = categories.get(q.category, 0) + 1
    assert categories == {c: 10 for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                          "stem", "humanities")}
    with_refs = [q.question_id for q in questions if q.references]
    assert with_refs == list(range(101, 131)) and all(len(q.references) == 2 for q in questions if q.references)
    q101 = next(q for q in questions if q.question_id == 101)
    assert q101.prompt == q101.turns[0] and q101.response == q101.references[0]


def test_real_alpaca_subset_is_counted_and_labelled(shared_data):
    items = read_json_list(shared_data / "alpaca" / "alpagasus_random_9k.json")
    assert len(items) == 9229 and sum(1 for r in items if r.data["input"].strip()) == 3666
    assert items[1].where.endswith("line 7")                        # 1-based line where the item starts
    splits = InstructionTask().load(NO_JUDGE, str(shared_data))
    assert len(splits.train) + len(splits.dev) == 9225 and len(splits.dev) == 184 and len(splits.test) == 80
    assert SUBSET_NOTE in splits.notes and "NOT the cleaned" in SUBSET_NOTE
    assert any("4 Alpaca items with an empty output dropped" in n for n in splits.notes)
    assert all(e.response for e in splits.train)


def test_alpaca_prompt():
    assert alpaca_prompt("Sum these.", "") == "Sum these."
    assert alpaca_prompt(" Sum these. ", " 1, 2 ") == "Sum these.\n\n1, 2"


def write_alpaca(root, text):
    (root / "alpaca").mkdir(parents=True, exist_ok=True)
    (root / "alpaca" / "alpagasus_random_9k.json").write_text(text)


def test_bad_alpaca_file_names_file_and_line(tmp_path):
    ok = '  {"instruction": "Say hi", "input": "", "output": "Hi"}'
    write_alpaca(tmp_path, "[\n" + ok + ",\n  {\"instruction\": \"x\", \"input\": 3, \"output\": \"y\"}\n]")
    with pytest.raises(DataError, match=r"alpagasus_random_9k\.json: line 3: .*input.*Fix or remove"):
        InstructionTask().load(NO_JUDGE, str(tmp_path))
    write_alpaca(tmp_path, "[\n" + ok + ",\n" + ok + ",\n  {\"instruction\": }\n]")
    with pytest.raises(DataError, match=r"line 4: invalid JSON"):
        InstructionTask().load(NO_JUDGE, str(tmp_path))
    write_alpaca(tmp_path, '{"instruction": "x"}')
    with pytest.raises(DataError, match=r"line 1: the file does not start a JSON list"):
        InstructionTask().load(NO_JUDGE, str(tmp_path))


def test_hub_source_reads_the_cleaned_set(shared_data, monkeypatch):
    import datasets

    rows = [{"instruction": f"Task {i}", "input": "", "output": f"Done {i}"} for i in range(100)]
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, *a, **k: {"train": rows} if path == "yahma/alpaca-cleaned" else pytest.fail(path))
    splits = InstructionTask().load({**NO_JUDGE, "source": "hub"}, str(shared_data))
    assert len(splits.train) == 98 and len(splits.dev) == 2
    assert not any(SUBSET_NOTE in n for n in splits.notes) and any("yahma/alpaca-cleaned" in n for n in splits.notes)


# ---------------------------------------------------------------------------- evaluation


class ScriptedJudge(Judge):
    """Replies from a function of the prompt; remembers the prompts."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def complete(self, prompts):
        self.prompts += list(prompts)
        return [Reply(self.reply(p)) for p in prompts]


@pytest.fixture
def bench(shared_data):
    questions = read_mt_bench(shared_data / "mt_bench")
    return [q for q in questions if q.question_id in (81, 101, 102, 131)]     # two with references


def test_two_turn_generation_rouge_and_judge(bench):
    seen = []

    def generate(prompts):
        seen.append(prompts)
        return [f"first answer {i}" if isinstance(p, str) else "second" for i, p in enumerate(prompts)]

    def reply(prompt):
        return "Fine answer.\nScore: 8/10" if "follow-up" not in prompt else "It is hard to say."

    task = InstructionTask()
    task.judge = ScriptedJudge(reply)
    result = task.evaluate(generate, bench)
    assert seen[0] == [q.turns[0] for q in bench]
    second = seen[1][0]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "first answer 0" and second[2]["content"] == bench[0].turns[1]
    assert result.rows[0]["prediction"] == ["first answer 0", "second"]
    assert result.score == 8.0                                         # unparsable turn 2: missing, not 0
    assert result.metrics["n_judged"] == 4 and result.metrics["judge_missing"] == 4
    assert result.metrics["judge_score_turn1"] == 8.0 and "judge_score_turn2" not in result.metrics
    assert result.rows[1]["judge_score"] == [8.0, None] and result.rows[0]["rouge_l"] == [None, None]
    q101 = next(q for q in bench if q.question_id == 101)
    ref_prompts = [p for p in task.judge.prompts if q101.references[1] in p]
    assert len(ref_prompts) == 1 and "first answer 1" in ref_prompts[0]        # turn 2 sees turn 1's answer
    assert 0 < result.metrics["rouge_l"] < 100


def test_rouge_l_of_perfect_answers_and_disabled_judge(bench, shared_data):
    task = InstructionTask()
    task.load({**NO_JUDGE, "max_eval_samples": 4}, str(shared_data))
    assert task.metric == "rouge_l"
    refs = {q.turns[0]: q.references for q in bench}

    def generate(prompts):
        out = []
        for p in prompts:
            first = p if isinstance(p, str) else p[0]["content"]
            turn = 0 if isinstance(p, str) else 1
            out.append(refs[first][turn] if refs[first] else "whatever")
        return out

    result = task.evaluate(generate, bench)
    assert result.score == pytest.approx(100.0) == result.metrics["rouge_l"]
    assert "n_judged" not in result.metrics and result.rows[2]["judge_score"] == [None, None]


def test_judge_config_is_checked_at_load(shared_data, monkeypatch):
    monkeypatch.delenv("PAPEFT_TEST_KEY", raising=False)
    openai = {"enabled": True, "backend": "openai", "model": "gpt-4", "api_key_env": "PAPEFT_TEST_KEY"}
    with pytest.raises(JudgeError, match="PAPEFT_TEST_KEY.*not set"):
        InstructionTask().load({"judge": openai}, str(shared_data))
    with pytest.raises(JudgeError, match="judge.backend='gpt'"):
        make_judge({"backend": "gpt"})
    with pytest.raises(JudgeError, match="no_such_model.yaml does not exist"):
        make_judge({"backend": "local", "backbone": "no_such_model"})
    with pytest.raises(JudgeError, match="no judge config"):
        InstructionTask().load({}, str(shared_data))
    assert make_judge({"enabled": False, "backend": "openai"}) is None
    with pytest.raises(ValueError, match="one split protocol"):
        InstructionTask().load({**NO_JUDGE, "split_protocol": "dev_only"}, str(shared_data))
    task = InstructionTask()
    notes = task.load({"judge": {**openai, "api_key_env": None}, "max_eval_samples": 2}, str(shared_data)).notes
    assert task.metric == "judge_score" and any("gpt-4" in n and "missing, not 0" in n for n in notes)


def test_hydra_selects_the_judge():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        default = compose("config", overrides=["task=alpaca_mtbench"])
        openai = compose("config", overrides=["task=alpaca_mtbench", "judge=openai", "judge.model=gpt-4o"])
        local = compose("config", overrides=["task=alpaca_mtbench", "judge.backbone=tiny_llama"])
        off = compose("config", overrides=["task=alpaca_mtbench", "judge.enabled=false"])
    assert default.task.judge.backend == "local" and default.task.name == "alpaca_mtbench"
    assert openai.task.judge.backend == "openai" and openai.task.judge.model == "gpt-4o"
    assert local.task.judge.backbone == "tiny_llama" and off.task.judge.enabled is False


# ---------------------------------------------------------------------------- score parsing


@pytest.mark.parametrize("text,score", [
    ("Score: 8/10", 8.0), ("Assistant 1: 7.5", 7.5), ("8 out of 10", 8.0), ("Rating: [[9]]", 9.0),
    ("Good answer.\n\n**Score:** 6", 6.0), ("I would rate this response a 4.", 4.0),
    ("Score for Assistant 1: 8", 8.0), ("On a scale of 1 to 10, I rate it 7", 7.0),
    ("Score out of 10: 6", 6.0), ("Overall I'd give it an 8.", 8.0), ("Review: fine.\n7", 7.0),
    ("Score: 85/100", 8.5), ("4/5", 8.0), ("Rating - 6.5", 6.5), ("It lists 3 steps.\nScore: 9/10", 9.0),
    ("Score: 7/10\nOn reflection, Score: 6/10", 6.0), ("Score: 0/10", 0.0), ("Score: 10", 10.0),
    ("In 2023 it was right. Score: 7", 7.0), ("Score: 2023", None), ("Score: 11", None), ("no score here", None), ("The answer has 3 mistakes and 2 typos.", None),
    ("", None), (None, None), ("Assistant 1 is helpful but verbose.", None),
])
def test_parse_score(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize("text,scores", [
    ("Scores: 7 8", (7.0, 8.0)), ("Assistant 1: 7\nAssistant 2: 8", (7.0, 8.0)),
    ("Response 1 Review: good. Score: 7\n\nResponse 2 Review: weak. Score: 5", (7.0, 5.0)),
    ("7/10, 8/10", (7.0, 8.0)), ("Assistant 1: 7, Assistant 2: 8", (7.0, 8.0)),
    ("Assistant 1 is good.\nAssistant 2 is bad.", (None, None)), ("nothing", (None, None)), ("", (None, None)),
])
def test_parse_pair_scores(text, scores):
    assert parse_pair_scores(text) == scores


def test_prompts_follow_appendix_d():
    pair = pairwise_prompt("Q?", "A1", "A2")
    assert "could you compare the two responses" in pair and "Response 1 from assistant 1:\nA1" in pair
    assert "Response 2 from assistant 2:\nA2" in pair
    assert "assigns a quantitative score on a scale of 10 to each response" in pair
    one = single_prompt("Q?", "A", reference="R")
    assert "score on a scale of 10" in one and "Query:\nQ?" in one and "Reference answer" in one and "\nR\n" in one
    assert "Reference answer" not in single_prompt("Q?", "A")
    judge = ScriptedJudge(lambda p: "Assistant 1: 6\nAssistant 2: 9")
    assert judge.score_pair("Q?", "A1", "A2") == (6.0, 9.0) and "A2" in judge.prompts[0]


# ---------------------------------------------------------------------------- local backend


class CharTokenizer:
    """A stand-in tokenizer over printable ASCII: one id per character; no chat template."""

    alphabet = string.printable
    bos_token, eos_token, bos_token_id, eos_token_id, pad_token_id = "^", "$", 1, 2, 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + self.alphabet.index(c) if c in self.alphabet else 3 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)

    def __len__(self):
        return 3 + len(self.alphabet)


def test_local_judge_runs_a_tiny_model_greedily(monkeypatch):
    tok = CharTokenizer()
    model = build_random("llama", TINY["llama"], vocab_size=len(tok), seed=0).eval()
    monkeypatch.setattr(judge_mod, "load_backbone", lambda cfg: (model, tok))
    judge = LocalJudge({"name": "tiny", "chat_template": "none"}, max_new_tokens=4, batch_size=2, max_length=200,
                       device="cpu")
    prompts = ["Score this: Q? A", "A longer question to score, and its answer", "x"]   # sorted into batches
    first, again = judge.complete(prompts), judge.complete(prompts)
    assert len(first) == 3 and all(isinstance(r.text, str) and r.error is None for r in first)
    assert first == again                                              # greedy: deterministic
    score = judge.score("Q?", "A")
    assert score is None or 0 <= score <= 10


class ScoreWriter(torch.nn.Module):
    """A fake causal LM whose `generate` appends the tokens of a fixed reply."""

    def __init__(self, tok, reply):
        super().__init__()
        self.reply, self.inputs = torch.tensor(tok(reply)["input_ids"]), []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, **kwargs):
        self.inputs.append(input_ids)
        assert kwargs["do_sample"] is False and kwargs["num_beams"] == 1
        return torch.cat([input_ids, self.reply.expand(len(input_ids), -1)], dim=1)


def test_local_judge_parses_what_the_model_writes(monkeypatch):
    tok = CharTokenizer()
    model = ScoreWriter(tok, "Helpful and correct. Score: 7/10")
    monkeypatch.setattr(judge_mod, "load_backbone", lambda cfg: (model, tok))
    judge = make_judge({"backend": "local", "backbone": {"name": "fake", "chat_template": "none"}, "device": "cpu"})
    assert judge.score("What is 2+2?", "4", reference="4") == 7.0
    seen = tok.decode(model.inputs[0][0].tolist())
    assert "What is 2+2?" in seen and "Reference answer" in seen


# ---------------------------------------------------------------------------- HTTP backend


class StubServer:
    """An OpenAI-style endpoint on 127.0.0.1 (ephemeral port) answering from a list of (status, body)."""

    def __init__(self, answers, delay_s=0.0):
        self.answers, self.requests, stub = list(answers), [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                status, payload = stub.answers.pop(0) if stub.answers else (200, "Score: 5")
                time.sleep(delay_s)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": payload}}]}
                                  if status == 200 else {"error": payload}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_server():
    servers = []

    def start(answers, delay_s=0.0):
        servers.append(StubServer(answers, delay_s))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_openai_judge_against_a_local_stub(stub_server, monkeypatch):
    monkeypatch.setenv("PAPEFT_TEST_KEY", "sk-test")
    server = stub_server([(500, "busy"), (200, "Clear and correct.\nScore: 9/10"), (200, "I cannot decide.")])
    judge = make_judge({"backend": "openai", "model": "gpt-4", "base_url": server.url, "api_key_env": "PAPEFT_TEST_KEY",
                        "timeout_s": 2, "retries": 2, "retry_backoff_s": 0.01})
    assert isinstance(judge, OpenAIJudge)
    reviews = judge.review_many([("Q1?", "A1", None), ("Q2?", "A2", "R2")])
    assert [r.score for r in reviews] == [9.0, None] and reviews[1].text == "I cannot decide."
    assert len(server.requests) == 3                                     # one retry after HTTP 500
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "gpt-4" and body["messages"][0]["role"] == "user"
    assert "Q1?" in body["messages"][0]["content"]
    assert "R2" in server.requests[2][2]["messages"][0]["content"]


def test_openai_judge_failures(stub_server):
    rejecting = stub_server([(401, "bad key")])
    judge = OpenAIJudge("gpt-4", base_url=rejecting.url, api_key_env=None, retries=3, retry_backoff_s=0.01)
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge.score("Q?", "A")
    assert len(rejecting.requests) == 1 and "Authorization" not in rejecting.requests[0][1]
    slow = stub_server([], delay_s=1.0)
    judge = OpenAIJudge("gpt-4", base_url=slow.url, api_key_env=None, timeout_s=0.2, retries=1, retry_backoff_s=0.01)
    start = time.monotonic()
    review = judge.review_many([("Q?", "A", None)])[0]
    assert review.score is None and "no reply after 2 tries" in review.error
    assert time.monotonic() - start < 2 * 0.2 + 1.5
