"""The task benchmark: generators checked against independent definitions, the training loop,
and the runner's resume."""

from __future__ import annotations

import torch

from attn_bench.task import tasks
from attn_bench.task.tasks import IGNORE


def _eval_recursive(tokens: list[str]) -> int:
    """An evaluator written apart from attn_bench.task.tasks: recursive descent, statistics for the median."""
    import statistics

    def parse(i: int) -> tuple[int, int]:
        tok = tokens[i]
        if tok.isdigit():
            return int(tok), i + 1
        args, i = [], i + 1
        while tokens[i] != "]":
            v, i = parse(i)
            args.append(v)
        fn = {
            "[MIN": min,
            "[MAX": max,
            "[SM": lambda a: sum(a) % 10,
            "[MED": lambda a: int(statistics.median(a)),
        }[tok]
        return fn(args), i + 1

    value, end = parse(0)
    assert end == len(tokens)
    return value


def test_listops_labels_match_an_independent_evaluator() -> None:
    data = tasks.listops(200, 128, seed=3, max_depth=6, max_args=5)
    assert data.inputs.shape == (200, 128) and not data.causal
    seen = set()
    for row, lab in zip(data.inputs, data.labels, strict=True):
        toks = tasks.listops_tokens(row)
        assert 64 < len(toks) < 128  # the length filter (min_len defaults to N/2)
        assert int(lab[0]) == _eval_recursive(toks)
        assert (lab[1:] == IGNORE).all()
        seen.add(tuple(toks))
    assert len(seen) == 200  # de-duplicated
    labels = data.labels[:, 0]
    assert len(set(labels.tolist())) > 5  # not one class


def test_listops_rules() -> None:
    assert tasks.listops_eval(["[MED", "1", "2", "3", "4", "]"]) == 2
    assert tasks.listops_eval(["[SM", "9", "[MAX", "2", "7", "]", "]"]) == 6
    exprs = tasks.listops_expressions(50, 0, max_depth=3, max_args=4, min_len=5, max_len=60)
    for toks in exprs:
        depth = best = 0
        for t in toks:
            depth += t in tasks.LISTOPS_OPS
            depth -= t == "]"
            best = max(best, depth)
        assert best <= 3  # a node at the depth bound is a digit
    assert tasks.listops(8, 64, seed=1).inputs.equal(tasks.listops(8, 64, seed=1).inputs)  # seeded


def test_mqar_answers_match_the_pairs() -> None:
    keys, values, pairs, n = 32, 16, 8, 64
    data = tasks.mqar(50, n, seed=5, pairs=pairs, num_keys=keys, num_values=values)
    assert data.causal and data.num_classes == values
    for row, lab in zip(data.inputs.tolist(), data.labels.tolist(), strict=True):
        bound = {row[2 * i]: row[2 * i + 1] - keys for i in range(pairs)}
        assert len(bound) == pairs and all(k < keys for k in bound)
        queries = [t for t in range(2 * pairs, n) if lab[t] != IGNORE]
        assert len(queries) == pairs
        assert {row[t] for t in queries} == set(bound)
        for t in queries:
            assert lab[t] == bound[row[t]]
        assert all(lab[t] == IGNORE for t in range(2 * pairs))


def test_local_max_labels_match_brute_force() -> None:
    data = tasks.local_max(10, 40, seed=2, width=5, vocab=30)
    for row, lab in zip(data.inputs.tolist(), data.labels.tolist(), strict=True):
        for t in range(40):
            assert lab[t] == max(row[max(0, t - 4) : t + 1]) % 10


def test_training_reduces_the_loss_on_a_tiny_case() -> None:
    from attn_bench.task.train import TaskModel, train

    torch.manual_seed(0)
    tr = tasks.local_max(256, 16, seed=0, width=2, vocab=10)
    te = tasks.local_max(64, 16, seed=1, width=2, vocab=10)
    model = TaskModel(tr.vocab_size, tr.num_classes, 16, variant="full", d_model=16, heads=2, layers=1)
    steps = []
    res = train(model, tr, te, steps=60, batch=16, lr=1e-2, eval_every=30, progress=lambda s, n, loss: steps.append(s))
    first = sum(loss for _, loss in res.loss_curve[:5]) / 5
    last = sum(loss for _, loss in res.loss_curve[-5:]) / 5
    assert last < 0.8 * first
    assert steps == list(range(1, 61))
    assert [s for s, _, _ in res.eval_curve] == [30, 60]
    assert res.tokens_per_s > 0 and res.peak_mem_bytes > 0


def _tiny(seed: int, variant: str = "full"):
    from attn_bench.task.run import TaskConfig

    return TaskConfig(
        task="local_max",
        variant=variant,
        seq_len=16,
        seed=seed,
        params=(("vocab", 10), ("width", 2)),
        steps=4,
        batch=4,
        d_model=8,
        heads=2,
        layers=1,
        train_size=16,
        test_size=8,
        eval_every=2,
        threads=1,
    )


def test_resume_skips_finished_runs_and_the_report_is_written(tmp_path) -> None:
    from attn_bench.core.config import RunSettings
    from attn_bench.task.report import write_task_report
    from attn_bench.task.run import RESULTS, read_task_results, run_tasks

    settings = RunSettings(timeout_s=120)
    first = [_tiny(0), _tiny(1)]
    ran = []
    rows = run_tasks(first, tmp_path, settings, progress=False, on_result=ran.append)
    assert [r.status for r in rows] == ["ok", "ok"] and len(ran) == 2
    ran.clear()
    more = [*first, _tiny(0, "sliding_window")]
    rows = run_tasks(more, tmp_path, settings, resume=True, progress=False, on_result=ran.append)
    assert [r.config for r in ran] == [more[2]]  # only the new run
    assert [r.config for r in read_task_results(tmp_path / RESULTS)] == more
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    assert all(0 <= r.final_acc <= 1 and r.train_s > 0 for r in rows)
    page = write_task_report(tmp_path)
    assert "local_max" in page.read_text() and (tmp_path / "accuracy_vs_n.png").exists()


def test_task_presets_expand_through_the_registry() -> None:
    from attn_bench.task.run import load_task_presets

    presets = load_task_presets()
    assert {"task-quick", "task-gpu"} <= set(presets)
    quick = presets["task-quick"].configs
    assert {c.task for c in quick} == {"listops", "mqar", "local_max"}
    for key in {(c.task, c.seq_len, c.variant, c.options) for c in quick}:
        assert len({c.seed for c in quick if (c.task, c.seq_len, c.variant, c.options) == key}) >= 3
