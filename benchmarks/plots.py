"""PNG plots from the benchmark's records: throughput vs concurrency, latency percentiles."""
from __future__ import annotations

from pathlib import Path

STYLE = {  # system -> (label, color, marker)
    "engine": ("engine", "tab:blue", "o"),
    "hf_sequential": ("HF generate, one after another", "tab:orange", "s"),
    "hf_batched": ("HF generate, batched (left-padded)", "tab:green", "^"),
    "server": ("server (gRPC)", "tab:red", "o"),
    "engine_direct": ("engine_direct (no server)", "tab:blue", "s"),
    "vllm_asyncllm": ("vLLM AsyncLLM", "tab:gray", "^"),
}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _line(ax, system, xs, ys, **kw):
    label, color, marker = STYLE[system]
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, color=color, label=label, **kw)


def throughput(engine_rows: list[dict], server_rows: list[dict], path: Path, title: str) -> Path:
    """Left: engine-level total tokens/s vs batch size; right: server vs engine-direct vs concurrency."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in ("engine", "hf_sequential", "hf_batched"):
        rows = sorted((r for r in engine_rows if r["system"] == system), key=lambda r: r["batch_size"])
        _line(left, system, [r["batch_size"] for r in rows], [r["total_tok_s"] for r in rows])
    left.set(title="engine vs HF transformers (median)", xlabel="concurrent requests (batch size)",
             ylabel="output tokens/s")
    closed = [r for r in server_rows if r["mode"] == "closed"]
    for system in ("server", "engine_direct"):
        rows = sorted((r for r in closed if r["system"] == system), key=lambda r: r["concurrency"])
        _line(right, system, [r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows])
    right.set(title="serving: closed loop", xlabel="concurrent streaming clients", ylabel="output tokens/s")
    return _save(plt, fig, (left, right), path, title, legend_size=8)


def latency(engine_rows: list[dict], server_rows: list[dict], path: Path, title: str) -> Path:
    """Left: per-step decode latency vs batch size. Middle, right: TTFT and inter-token p50/p99 vs
    concurrency (closed loop); the open-loop runs' p50 as dotted horizontal lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for system in ("engine", "hf_sequential", "hf_batched"):
        rows = sorted((r for r in engine_rows if r["system"] == system), key=lambda r: r["batch_size"])
        _line(axes[0], system, [r["batch_size"] for r in rows], [r["step_ms"] for r in rows])
    axes[0].set(title="decode step latency (median)", xlabel="batch size", ylabel="ms per step")
    closed = [r for r in server_rows if r["mode"] == "closed"]
    opened = [r for r in server_rows if r["mode"] == "open"]
    for ax, metric, name in ((axes[1], "ttft_ms", "time to first token"), (axes[2], "itl_ms", "inter-token latency")):
        for system in ("server", "engine_direct"):
            rows = sorted((r for r in closed if r["system"] == system), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in rows]
            label, color, marker = STYLE[system]
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [r[metric][q] for r in rows]
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker=marker, color=color, label=f"{label} {q}")
            for r in (r for r in opened if r["system"] == system and r[metric]["p50"] is not None):
                ax.axhline(r[metric]["p50"], color=color, linestyle=":", linewidth=1,
                           label=f"{label} p50, Poisson {r['rate_per_s']}/s")
        ax.set(title=f"{name}: p50 solid, p99 dashed", xlabel="concurrent streaming clients (closed loop)",
               ylabel="ms")
    return _save(plt, fig, axes, path, title, legend_size=7)


def load_grid(rows: list[dict], path: Path, title: str) -> Path:
    """Issue #28's grid (benchmarks/load_grid.rows): one column per prompt kind and output length;
    output tokens/s (top) and TTFT p50 (bottom) against closed-loop clients, vLLM beside ours."""
    plt = _plt()
    closed = [r for r in rows if r["mode"] == "closed"]  # rows() orders them: by length, kind, then clients
    blocks = list(dict.fromkeys((r["prompt_kind"], r["max_tokens"]) for r in closed))
    fig, axes = plt.subplots(2, len(blocks), figsize=(4.2 * len(blocks), 7.4), squeeze=False)
    for column, (kind, tokens) in enumerate(blocks):
        points = [r for r in closed if (r["prompt_kind"], r["max_tokens"]) == (kind, tokens)]
        for system in ("vllm_asyncllm", "engine_direct", "server"):
            at = [(r["concurrency"], r["systems"][system]) for r in points if system in r["systems"]]
            _line(axes[0][column], system, [c for c, _ in at], [s["tokens_per_s"] for _, s in at])
            _line(axes[1][column], system, [c for c, _ in at], [s["ttft_ms"]["p50"] for _, s in at])
        axes[0][column].set(title=f"{kind} prompts, {tokens} tokens", xlabel="clients", ylabel="output tokens/s")
        axes[1][column].set(title="TTFT p50", xlabel="clients", ylabel="ms")
    return _save(plt, fig, [ax for pair in axes for ax in pair], path, title, legend_size=7)


def _save(plt, fig, axes, path: Path, title: str, legend_size: int) -> Path:
    """Common finish of every figure: axes from zero, grid, legends, title; written as PNG."""
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=legend_size)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
