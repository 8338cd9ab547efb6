"""serving/intake.py: prompts tokenized off execute, those waiting batched by one engine step's tokens, submitted in order."""
import threading

from backend.default_model import ensure_default_checkpoint
from backend.tokenizer import Tokenizer
from serving.intake import CHARS_PER_TOKEN, PromptIntake

STEP_TOKENS = 2048


class Recorder:
    def __init__(self, fail_submit_of=()):
        self.batches, self.submitted, self.failed = [], [], []
        self.events = []  # ("encode", batch size) and ("submit", item), in the order they happened
        self.fail_submit_of = set(fail_submit_of)
        self.first_submit_started, self.release_first = threading.Event(), threading.Event()

    def encode_batch(self, prompts):
        self.batches.append(list(prompts))
        self.events.append(("encode", len(prompts)))
        if "bad" in prompts:
            raise ValueError("cannot tokenize")
        return [[len(p)] for p in prompts]

    def submit(self, item, prompt_ids):
        if not self.submitted:  # hold the thread on the first one while more are queued
            self.first_submit_started.set()
            assert self.release_first.wait(5)
        if item in self.fail_submit_of:
            raise RuntimeError(f"submit of {item} failed")
        self.submitted.append((item, prompt_ids))
        self.events.append(("submit", item))

    def fail(self, item, error):
        self.failed.append((item, str(error)))


def test_the_requests_queued_meanwhile_are_tokenized_in_one_batch_and_submitted_in_order():
    rec = Recorder()
    intake = PromptIntake(rec.encode_batch, rec.submit, rec.fail, STEP_TOKENS)
    intake.put("r0", "a")
    assert rec.first_submit_started.wait(5)
    for i in range(1, 5):
        intake.put(f"r{i}", "x" * i)
    rec.release_first.set()
    intake.stop()
    assert rec.batches == [["a"], ["x", "xx", "xxx", "xxxx"]]
    assert rec.submitted == [("r0", [1])] + [(f"r{i}", [i]) for i in range(1, 5)]
    assert rec.failed == []


def test_a_burst_of_long_prompts_is_tokenized_a_step_at_a_time_each_batch_submitted_before_the_next():
    rec = Recorder()
    intake = PromptIntake(rec.encode_batch, rec.submit, rec.fail, STEP_TOKENS)
    intake.put("r0", "a")
    assert rec.first_submit_started.wait(5)
    step_chars = STEP_TOKENS * CHARS_PER_TOKEN
    long_prompt, short_prompt = "x" * (step_chars // 2), "y" * 10
    for i, prompt in enumerate([long_prompt, long_prompt, long_prompt, short_prompt, short_prompt, "z" * (step_chars + 1)]):
        intake.put(f"r{i + 1}", prompt)
    rec.release_first.set()
    intake.stop()
    assert [len(batch) for batch in rec.batches] == [1, 2, 3, 1]  # a step's chars, or one prompt over it
    assert rec.events == [("encode", 1), ("submit", "r0"), ("encode", 2), ("submit", "r1"), ("submit", "r2"),
                          ("encode", 3), ("submit", "r3"), ("submit", "r4"), ("submit", "r5"),
                          ("encode", 1), ("submit", "r6")]
    assert rec.failed == []


def test_a_batch_that_does_not_tokenize_fails_its_requests_and_the_next_ones_still_go_through():
    rec = Recorder(fail_submit_of={"r3"})
    rec.release_first.set()
    intake = PromptIntake(rec.encode_batch, rec.submit, rec.fail, STEP_TOKENS)
    intake.put("r0", "ok")
    intake.stop()  # r0 alone in its batch
    intake = PromptIntake(rec.encode_batch, rec.submit, rec.fail, STEP_TOKENS)
    intake.put("r1", "bad")
    intake.put("r2", "fine")
    intake.stop()
    intake = PromptIntake(rec.encode_batch, rec.submit, rec.fail, STEP_TOKENS)
    intake.put("r3", "boom")  # its submit raises: r3 fails, r4 goes on
    intake.put("r4", "after")
    intake.stop()
    assert [item for item, _ in rec.submitted] == ["r0", "r4"]
    assert rec.failed == [("r1", "cannot tokenize"), ("r2", "cannot tokenize"), ("r3", "submit of r3 failed")]


def test_stop_submits_what_was_queued_before_it():
    rec = Recorder()
    intake = PromptIntake(rec.encode_batch, rec.submit, rec.fail, STEP_TOKENS)
    intake.put("r0", "a")
    assert rec.first_submit_started.wait(5)
    intake.put("r1", "bb")
    stopper = threading.Thread(target=intake.stop)
    stopper.start()
    rec.release_first.set()
    stopper.join(5)
    assert not stopper.is_alive()
    assert rec.submitted == [("r0", [1]), ("r1", [2])]


def test_the_tokenizers_batch_gives_each_prompts_own_tokens():
    tokenizer = Tokenizer(ensure_default_checkpoint())
    prompts = ["Hello", "The capital of France is", "ünïcödé and emoji 🙂", " leading space", "x" * 3000]
    assert tokenizer.encode_batch(prompts) == [tokenizer.encode(p) for p in prompts]
    assert tokenizer.encode_batch(prompts)[0][0] == tokenizer.bos_token_id
