"""Continuous batching in the serve worker: requests join a running batch between decode steps and leave
when done, each decodes exactly the tokens it decodes alone (greedy and seeded sampling), adapters never
mix, and an adapter unloaded under a running request stops it. Order is checked by events, not time."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_adapter  # noqa: E402

from loraforge.serve.decoding import Job, Sampling

PROMPTS = ["What colour is the sky?", "Tell me about snow and white things.", "What colour is the plum? The plum",
           "Answer with one word only please. What colour is the coal?"]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    from loraforge.serve.batching import BatchWorker
    from loraforge.serve.server import load_registry

    d = tmp_path_factory.mktemp("cb-adapters")
    paths = {n: str(make_adapter(tiny_model, d / n, seed)) for n, seed in (("a", 1), ("b", 2), ("c", 3))}
    reg = load_registry(str(tiny_model), paths, device="cpu", name="tiny")
    worker = BatchWorker(reg, max_batch=8, wait_ms=1)
    yield reg, worker, paths
    worker.close()


def make_job(reg, adapter, prompt, max_tokens, log, name, sampling=Sampling(ignore_eos=True), on_emit=None):
    from loraforge.data.templates import prompt_text

    ids = reg.tokenizer(prompt_text(reg.tokenizer, [{"role": "user", "content": prompt}]),
                        add_special_tokens=False)["input_ids"]
    done = threading.Event()
    job = None

    def emit(delta, finish):
        log.append((name, len(job.tokens), finish))
        if on_emit:
            on_emit(job, finish)
        if finish is not None:
            done.set()

    job = Job(ids, adapter, max_tokens, emit, sampling=sampling)
    job.finished = done  # type: ignore[attr-defined]
    return job


def alone(reg, worker, adapter, prompt, max_tokens, sampling=Sampling(ignore_eos=True)) -> list[int]:
    job = make_job(reg, adapter, prompt, max_tokens, [], "alone", sampling)
    worker.submit(job)
    assert job.finished.wait(60)
    assert job.finish_reason in ("length", "stop")
    return list(job.tokens)


def test_a_request_joins_a_running_one_and_finishes_first(setup):
    reg, worker, _ = setup
    long_alone = alone(reg, worker, "a", PROMPTS[0], 40)
    short_alone = alone(reg, worker, "b", PROMPTS[1], 6)
    assert len(long_alone) == 40 and len(short_alone) == 6
    log: list = []
    seen: dict = {}
    short = make_job(reg, "b", PROMPTS[1], 6, log, "short",
                     on_emit=lambda j, f: seen.setdefault("long_tokens_at_short_end", len(long.tokens))
                     if f is not None else None)

    def join_at_5(job, finish):  # runs on the worker thread, between two decode steps
        if len(job.tokens) >= 5 and "submitted" not in seen:
            seen["submitted"] = len(job.tokens)
            worker.submit(short)

    long = make_job(reg, "a", PROMPTS[0], 40, log, "long", on_emit=join_at_5)
    worker.submit(long)
    assert long.finished.wait(60) and short.finished.wait(60)
    assert 5 <= seen["submitted"] < seen["long_tokens_at_short_end"] < 40  # short ended while long still ran
    names = [n for n, *_ in log]
    assert names.index("short") < len(names) - 1 - names[::-1].index("long")  # interleaved, not one after another
    finishes = [n for n, _, f in log if f is not None]
    assert finishes == ["short", "long"]
    assert short.tokens == short_alone and long.tokens == long_alone
    assert worker.stats()["max_rows"] >= 2


def test_joined_outputs_equal_alone_outputs_for_mixed_adapters_and_seeded_sampling(setup):
    reg, worker, _ = setup
    sampled = Sampling(temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    specs = [("a", PROMPTS[0], 30, Sampling(ignore_eos=True)), ("tiny", PROMPTS[1], 9, Sampling(ignore_eos=True)),
             ("b", PROMPTS[2], 14, sampled), ("c", PROMPTS[3], 20, Sampling(ignore_eos=True)),
             ("a", PROMPTS[3], 3, Sampling(ignore_eos=True)), ("b", PROMPTS[1], 25, Sampling(ignore_eos=True))]
    specs = [(reg.adapter_for(a), p, n, s) for a, p, n, s in specs]
    solo = [alone(reg, worker, *s) for s in specs]
    assert len({tuple(t) for t in solo}) == len(solo)  # every request decodes something different
    assert alone(reg, worker, *specs[2]) == solo[2]  # same seed, same tokens
    log: list = []
    jobs: list[Job] = []

    def chain(i):  # the first starts alone; each later one joins when the one before it has decoded 2 tokens
        def on_emit(job, finish):
            if len(job.tokens) >= 2 and i + 1 < len(specs) and len(jobs) == i + 1:
                jobs.append(make_job(reg, *specs[i + 1][:3], log, i + 1, specs[i + 1][3], on_emit=chain(i + 1)))
                worker.submit(jobs[-1])
        return on_emit

    jobs.append(make_job(reg, *specs[0][:3], log, 0, specs[0][3], on_emit=chain(0)))
    worker.submit(jobs[0])
    for j in jobs:  # job i appends job i + 1 before it finishes, so this loop meets them all
        assert j.finished.wait(60)
    assert len(jobs) == len(specs)
    assert [j.tokens for j in jobs] == solo
    assert worker.stats()["max_rows"] >= 4


def test_unloading_an_adapter_stops_its_running_request_and_spares_the_others(setup):
    reg, worker, paths = setup
    b_alone = alone(reg, worker, "b", PROMPTS[0], 30)
    log: list = []
    reached, unloading = threading.Event(), threading.Event()

    def hold_at_3(job, finish):  # on the worker thread: wait until the unload is queued at the gate
        if len(job.tokens) >= 3 and not reached.is_set():
            reached.set()
            assert unloading.wait(30)

    c_job = make_job(reg, "c", PROMPTS[0], 200, log, "c", on_emit=hold_at_3)
    b_job = make_job(reg, "b", PROMPTS[0], 30, log, "b")
    worker.submit(c_job)
    worker.submit(b_job)
    assert reached.wait(60)
    t = threading.Thread(target=reg.unload, args=("c",))
    t.start()
    while not reg.gate.locked():  # the unload holds the gate and waits for the step in flight
        t.join(0.01)
    unloading.set()
    t.join(60)
    try:
        assert c_job.finished.wait(60) and b_job.finished.wait(60)
        assert c_job.finish_reason == "adapter_unloaded" and len(c_job.tokens) <= 4
        assert b_job.finish_reason == "length" and b_job.tokens == b_alone
        assert "c" not in reg.names() and reg.serial("c") is None
    finally:
        reg.load("c", paths["c"])
