"""engine/graphs.py on the CPU, where a capture is simulated as a GPU does it: capturing only records a
micro-batch's work, which runs when the graph is replayed. Every micro-batch must count once in the gradient
whether it ran eagerly, was captured or was replayed; a capture must come straight after an eager run of the
same micro-batch (its last warm-up, so that compilation and autotuning never happen inside a capture: the
Llama-2-7B recipe's capture failed when a recompiled block benchmarked a kernel there); and a failed capture
leaves the run eager and correct."""

import pytest
import torch

from conftest import CPU, FP32, tiny_model, trainable_grads
from snugtune.data.batches import collate
from snugtune.engine.graphs import StepGraphs
from snugtune.engine.step import forward_backward


class RecordedWork:
    """Stands for a captured torch.cuda.CUDAGraph: replay() runs the recorded work on the static inputs."""

    def __init__(self, work):
        self.replay = work


def shape_key(inputs: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in inputs.items())


def recording_graphs(model, events: list, fail: bool = False, objective=None) -> StepGraphs:
    """StepGraphs on the CPU with captures on: each capture (or, with fail, an error) and each eager run logged.
    A replay refills the capture's outputs (the loss, the objective's metrics) as a graph's would."""
    graphs = StepGraphs(model, CPU, FP32, FP32.grad_scaler(), **({"objective": objective} if objective else {}))
    graphs.captures = True
    eager = graphs._eager

    def logged_eager(on_device, key, metrics=None):
        events.append(("eager", key))
        return eager(on_device, key, metrics)

    def capture(static):
        events.append(("capture", shape_key({k: v for k, v in static.items() if k != "examples"})))
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        loss, outputs = torch.zeros(()), {}

        def replay():
            outputs.clear()
            sums = graphs._forward_backward(static, outputs)
            loss.resize_(sums.shape).copy_(sums)

        return RecordedWork(replay), static, loss, outputs

    graphs._eager, graphs._capture = logged_eager, capture
    return graphs


def micro_batches(tokenizer, data) -> list:
    """Two shapes, A and B, in the order A A A B A B B A B: each is captured at its third run; then A is
    replayed twice and B once."""
    a, b = collate(data.train[:2], tokenizer.pad_token_id), collate(data.train[2:5], tokenizer.pad_token_id)
    assert a["input_ids"].shape != b["input_ids"].shape
    return [a, a, a, b, a, b, b, a, b]


def through_graphs(tmp_path, alpaca_file, fail: bool = False):
    """Run the micro-batches once eagerly (the reference), then through recording StepGraphs. Returns
    (events, graphs, losses, gradients, the reference's losses and gradients)."""
    _, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0})
    batches = micro_batches(tokenizer, data)
    weight = 1.0 / len(batches)
    model.zero_grad(set_to_none=True)
    expected_losses = [float(forward_backward(model, dict(b), weight, FP32, FP32.grad_scaler(), fixed_shape=True))
                       for b in batches]
    expected = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    events = []
    graphs = recording_graphs(model, events, fail)
    losses = [float(graphs.forward_backward(b, weight)) for b in batches]
    return events, graphs, losses, trainable_grads(model), expected_losses, expected


def test_every_micro_batch_counts_once_and_each_capture_follows_an_eager_run_of_it(tmp_path, alpaca_file):
    events, graphs, losses, grads, expected_losses, expected = through_graphs(tmp_path, alpaca_file)

    captures = [i for i, (kind, _) in enumerate(events) if kind == "capture"]
    assert len(captures) == 2 and graphs.failure is None
    for i in captures:
        assert events[i - 1] == ("eager", events[i][1])  # the shape's last warm-up ran right before
    assert len([e for e in events if e[0] == "eager"]) == len(losses) - 3  # three replays
    assert max(abs(x - y) for x, y in zip(losses, expected_losses)) < 1e-4
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), name


def test_a_failed_capture_leaves_the_run_eager_with_the_same_gradients(tmp_path, alpaca_file):
    events, graphs, _, grads, _, expected = through_graphs(tmp_path, alpaca_file, fail=True)

    assert graphs.failure == "RuntimeError: operation not permitted when stream is capturing"
    assert [kind for kind, _ in events].count("capture") == 1  # no capture is tried after a failure
    assert len([e for e in events if e[0] == "eager"]) == 9 and not graphs.graphs
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("objective,sections", [("dpo", {}), ("orpo", {}), ("orpo", {"preference": {"prompt_nll": True}})])
def test_a_preference_step_through_graphs_equals_the_eager_step(tmp_path, objective, sections):
    # DPO (its reference forward with the adapter disabled recorded beside the policy's) and ORPO (two loss
    # terms, two weights): captured micro-batches replayed give the eager step's loss, metrics and gradients
    from snugtune.engine.step import accumulate_gradients
    from snugtune.preference_loss import metric_means
    from test_preference_step import preference_model
    t, model, tokenizer, data = preference_model(tmp_path, objective, lora={"dropout": 0.0}, **sections)
    pad = tokenizer.pad_token_id
    a = t.collate([[e] for e in data.train[:2]], pad, packed=False)
    b = t.collate([[e] for e in data.train[2:5]], pad, packed=False)
    group = [a, a, a, b, a]  # a captured at its third run, replayed at its fourth
    results = []
    for graphs in (None, "recording"):
        model.zero_grad(set_to_none=True)
        events, metrics = [], {}
        stepper = recording_graphs(model, events, objective=t) if graphs else None
        loss = accumulate_gradients(model, group, FP32, FP32.grad_scaler(), CPU, graphs=stepper, objective=t,
                                    metrics=metrics)
        results.append((loss, metric_means(metrics), trainable_grads(model), events))
    (loss, metrics, grads, _), (graph_loss, graph_metrics, graph_grads, events) = results
    assert [kind for kind, _ in events] == ["eager", "eager", "eager", "capture", "eager"]  # then one replay
    assert graph_loss == pytest.approx(loss, rel=1e-5)
    assert graph_metrics.keys() == metrics.keys() and "rewards/margins" in metrics
    for name, value in metrics.items():
        assert graph_metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for name, grad in grads.items():
        torch.testing.assert_close(graph_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
