"""GPU benchmark: gemma-2b shapes with random bf16 weights; our TE engine path against HF transformers.

    python3 -m benchmarks.gpu_bench [--batches 1,8,32,64] [--prompt 64] [--new 64] [--fp8-recipes current,delayed]
                                    [--fp8-lm-head] [--compare-unfused] [--compare-te-norms] [--hf-compile]
                                    [--profile]

Prints one JSON object per line (also appended to --out); the last line is the summary.

What is measured, per batch size B (B prompts of --prompt random tokens, --new greedy tokens each):
- te: our engine's step loop, as backend.engine runs it minus sampling: the attention backend's
  build_step on the host,
  then model(token_ids, layout, kv_cache) (CUDA-graph replay for decode steps), argmax, .tolist() (the
  host sync every engine step has). decode tok/s = B * (new - 1) / decode time. Also the GPU time
  of the forward alone (CUDA events) and the host time of build_step.
- hf_eager: GemmaForCausalLM.generate (same weights, bf16, dynamic cache, greedy); decode time =
  time(new tokens) - time(1 token), so both sides exclude the prefill.
- hf_compile (--hf-compile): generate with a static cache, which HF compiles with torch.compile.
- floor: bytes of weights one decode step reads / datasheet HBM bandwidth (H100 SXM: 3.35 TB/s,
  H200: 4.8 TB/s), and the same bytes over the copy bandwidth measured here.
- te_fp8_<recipe>: the TE model with FP8 weights and GEMMs, per FP8 recipe; accuracy against bf16
  on the same (teacher-forced) tokens: logits relative error and top-1 agreement.
- te_fp8_<recipe>_lm_head (--fp8-lm-head): the same with the tied LM head in FP8 too.
- te_unfused (--compare-unfused): the TE model with the plain-torch attention instead of the fused
  Triton kernels (backend/attention/fused.py).
- te_te_norms (--compare-te-norms): the TE model with TE's own norms, residual adds and GeGLU
  (LayerNormLinear / LayerNormMLP) instead of backend/kernels/pointwise.py's kernels.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from backend.graphs import DecodeGraphs

from .random_checkpoint import gemma_2b_config, make_checkpoint

# Datasheet HBM bandwidth per GPU name (the floor's denominator); H100 SXM5 unless named here.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12}
H100_SXM_BYTES_PER_S = 3.35e12


def datasheet_bandwidth(name: str) -> float:
    for key, value in HBM_BYTES_PER_S.items():
        if key in name:
            return value
    return H100_SXM_BYTES_PER_S


def emit(out_file, **fields) -> dict:
    line = json.dumps(fields)
    print(line, flush=True)
    if out_file:
        with open(out_file, "a") as f:
            f.write(line + "\n")
    return fields


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() * 2 / (start.elapsed_time(end) / 1e3)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _GpuTimer:
    """CUDA events around a region (host clock on CPU, for dry runs)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def start(self):
        if self.cuda:
            self.events[0].record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.events[1].record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        if not self.cuda:
            return self.t1 - self.t0
        self.events[1].synchronize()
        return self.events[0].elapsed_time(self.events[1]) / 1e3


def make_cache(model, max_batch: int, prompt_len: int, new: int):
    """One paged cache per model for the whole run: CUDA graphs bake in its address, so a new
    cache per run would recapture them."""
    from backend.kv_cache import PagedKVCache

    per_seq = math.ceil((prompt_len + new) / 16)
    return PagedKVCache(model.cfg, num_blocks=max_batch * per_seq + 1, block_size=16, dtype=model.dtype,
                        device=model.device)


def attention_of(model):
    """The attention backend of a model, or of the model a DecodeGraphs wraps."""
    return getattr(model, "attention", None) or model.model.attention


def te_run(model, cfg, kv, batch: int, prompt_len: int, new: int, seed: int = 0, forced=None, keep_logits=False):
    """The engine's step loop for `batch` sequences: one prefill step, then new-1 decode steps."""
    from backend.batch import HostToDevice, SeqChunk

    block, device = kv.block_size, model.device
    per_seq = math.ceil((prompt_len + new) / block)
    tables = [kv.pool.allocate(per_seq) for _ in range(batch)]
    build_step, uploader = attention_of(model).build_step, HostToDevice(device)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=gen).tolist()
    timer = _GpuTimer(device)
    logits_kept, chosen = [], []

    _sync(device)
    t0 = time.perf_counter()
    ids, layout = build_step([SeqChunk(p, 0, t, True) for p, t in zip(prompts, tables)], block, uploader)
    logits = model(ids, layout, kv)
    tokens = logits.argmax(-1).tolist() if forced is None else forced[0]
    t_prefill = time.perf_counter() - t0
    chosen.append(tokens)
    host_build = gpu_fwd = 0.0
    t1 = time.perf_counter()
    for i in range(1, new):
        h0 = time.perf_counter()
        ids, layout = build_step([SeqChunk([tok], prompt_len + i - 1, t, True) for tok, t in zip(tokens, tables)],
                                 block, uploader)
        host_build += time.perf_counter() - h0
        timer.start()
        logits = model(ids, layout, kv)
        timer.stop()
        if keep_logits:
            logits_kept.append(logits)
        tokens = logits.argmax(-1).tolist() if forced is None else forced[i]  # syncs, like the sampler
        gpu_fwd += timer.seconds()
        chosen.append(tokens)
    t_decode = time.perf_counter() - t1
    for table in tables:
        kv.pool.release(table)
    steps = new - 1
    return dict(prefill_s=t_prefill, decode_s=t_decode, decode_tok_s=batch * steps / t_decode,
                step_ms=1e3 * t_decode / steps, forward_gpu_ms=1e3 * gpu_fwd / steps,
                build_step_ms=1e3 * host_build / steps), chosen, logits_kept


def profile_step(model, cfg, kv, batch: int, prompt_len: int, steps: int = 20) -> dict:
    """Kernel time inside decode steps (CUDA-graph replays) against their wall time: is a step
    bound by kernel work (GEMM efficiency) or by gaps between kernels?"""
    from torch.profiler import ProfilerActivity, profile

    from backend.batch import HostToDevice, SeqChunk

    per_seq = math.ceil((prompt_len + steps + 1) / kv.block_size)
    tables = [kv.pool.allocate(per_seq) for _ in range(batch)]
    build_step, uploader = attention_of(model).build_step, HostToDevice(model.device)
    ids, layout = build_step([SeqChunk(list(range(3, 3 + prompt_len)), 0, t, True) for t in tables],
                             kv.block_size, uploader)
    model(ids, layout, kv)
    inputs = [build_step([SeqChunk([5], prompt_len + i, t, True) for t in tables], kv.block_size, uploader)
              for i in range(steps)]
    model(*inputs[0], kv)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for ids, layout in inputs:
            model(ids, layout, kv)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    for table in tables:
        kv.pool.release(table)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 1e3 / steps  # ms per step
    by_name: dict = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3 / steps
    top = sorted(by_name.items(), key=lambda kv_: -kv_[1])[:14]
    return dict(wall_ms=1e3 * wall, kernel_ms=total, kernels_per_step=len(kernels) / steps,
                top=[(name[:80], round(ms, 4)) for name, ms in top])


def run_variant(out, name: str, model, te16_step, kv16, batches, prompt: int, new: int, profile: bool) -> dict:
    """Decode speed of a TE variant per batch size, and its accuracy against the bf16 model on the
    same teacher-forced tokens (logits relative error, top-1 agreement)."""
    emit(out, kind="setup", what=f"{name}_load", weight_bytes=model.weight_bytes_per_step())
    kv = make_cache(model, max(batches + [8]), prompt, new)
    step = DecodeGraphs(model)  # as the engine's runner calls the model
    rows = {}
    for b in batches:
        te_run(step, model.cfg, kv, b, prompt, new)  # warm-up: captures this batch's graphs
        r, _, _ = te_run(step, model.cfg, kv, b, prompt, new, seed=1)
        rows[b] = emit(out, kind=name, batch=b, graphs_disabled=step.disabled, **r)
    if profile:
        for b in (1, max(batches)):
            emit(out, kind="profile", variant=name, batch=b, **profile_step(step, model.cfg, kv, b, prompt))
    acc_batch = 8
    _, chosen, ref_logits = te_run(te16_step, model.cfg, kv16, acc_batch, prompt, new, seed=2, keep_logits=True)
    _, _, got_logits = te_run(step, model.cfg, kv, acc_batch, prompt, new, seed=2, forced=chosen, keep_logits=True)
    a, f = torch.stack(ref_logits).float(), torch.stack(got_logits).float()
    emit(out, kind="accuracy", variant=name, batch=acc_batch, positions=a.shape[0] * a.shape[1],
         logits_rel_err=float((f - a).norm() / a.norm()),
         top1_agreement=float((f.argmax(-1) == a.argmax(-1)).float().mean()))
    return rows


def hf_generate_time(hf, batch: int, prompt_len: int, new: int, **kw) -> float:
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    torch.cuda.synchronize()
    assert out.shape[1] == prompt_len + new, out.shape
    return time.perf_counter() - t0


def hf_decode(hf, batch, prompt_len, new, **kw):
    hf_generate_time(hf, batch, prompt_len, 4, **kw)  # warm-up
    t1 = hf_generate_time(hf, batch, prompt_len, 1, **kw)
    tn = hf_generate_time(hf, batch, prompt_len, new, **kw)
    return dict(decode_tok_s=batch * (new - 1) / (tn - t1), step_ms=1e3 * (tn - t1) / (new - 1))


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return torch.cuda.get_device_name()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--fp8-recipes", default="current,delayed",
                   help="FP8 variants to run (comma-separated recipes of backend.te.model.make_fp8_recipe; empty: none)")
    p.add_argument("--fp8-lm-head", action="store_true", help="also each FP8 variant with its LM head in FP8")
    p.add_argument("--compare-unfused", action="store_true",
                   help="also the TE model with the plain-torch attention instead of the fused Triton kernels")
    p.add_argument("--compare-te-norms", action="store_true",
                   help="also the TE model with TE's norms and adds instead of the fused residual add + RMSNorm")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--hf-compile", action="store_true", help="also HF static cache + torch.compile (slow to compile)")
    p.add_argument("--profile", action="store_true",
                   help="kernel time vs wall time of decode steps, batch 1 and the largest, for every TE variant")
    p.add_argument("--out", default=None)
    p.add_argument("--checkpoint-dir", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    out = args.out
    import transformers

    import transformer_engine

    from backend.te.runner import load_te_model

    emit(out, kind="env", gpu=gpu_name(), torch=torch.__version__, cuda=torch.version.cuda,
         transformers=transformers.__version__, transformer_engine=transformer_engine.__version__,
         prompt=args.prompt, new=args.new, layers=args.layers, argv=sys.argv[1:])
    ckpt = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="gemma2b-random-"))
    t0 = time.perf_counter()
    hf = make_checkpoint(ckpt, gemma_2b_config(args.layers))
    emit(out, kind="setup", what="hf_model_and_checkpoint", seconds=time.perf_counter() - t0)
    bw = copy_bandwidth()
    hbm = datasheet_bandwidth(torch.cuda.get_device_name())
    t0 = time.perf_counter()
    te16 = load_te_model(ckpt, torch.bfloat16, "cuda")
    te16_step = DecodeGraphs(te16)  # decode steps replayed from CUDA graphs, as the engine's runner does
    cfg = te16.cfg
    weight_bytes = te16.weight_bytes_per_step()
    emit(out, kind="setup", what="te_bf16_load", seconds=time.perf_counter() - t0, weight_bytes=weight_bytes,
         copy_bandwidth_GBs=bw / 1e9, floor_ms_datasheet=1e3 * weight_bytes / hbm,
         floor_ms_measured_bw=1e3 * weight_bytes / bw)
    results: dict = {"te_bf16": {}, "hf_eager": {}, "hf_compile": {}}

    kv16 = make_cache(te16, max(batches + [8]), args.prompt, args.new)
    for b in batches:
        try:
            te_run(te16_step, cfg, kv16, b, args.prompt, args.new)  # warm-up: captures this batch's graphs
            r, _, _ = te_run(te16_step, cfg, kv16, b, args.prompt, args.new, seed=1)
            results["te_bf16"][b] = emit(out, kind="te_bf16", batch=b, graphs_disabled=te16_step.disabled, **r)
        except Exception as e:  # noqa: BLE001 - a failed section must not hide the others
            emit(out, kind="error", section="te_bf16", batch=b, error=repr(e))
    if args.profile:
        for b in (1, max(batches)):
            try:
                emit(out, kind="profile", variant="te_bf16", batch=b,
                     **profile_step(te16_step, cfg, kv16, b, args.prompt))
            except Exception as e:  # noqa: BLE001
                emit(out, kind="error", section="profile", batch=b, error=repr(e))
    if not args.no_hf:
        for b in batches:
            try:
                results["hf_eager"][b] = emit(out, kind="hf_eager", batch=b,
                                              **hf_decode(hf, b, args.prompt, args.new))
            except Exception as e:  # noqa: BLE001
                emit(out, kind="error", section="hf_eager", batch=b, error=repr(e))

    # Other TE variants, one loaded at a time, each against te_bf16 in this same run.
    variants = {f"te_fp8_{r}": dict(fp8=True, fp8_recipe=r) for r in args.fp8_recipes.split(",") if r}
    if args.fp8_lm_head:
        variants.update({f"{name}_lm_head": dict(kw, fp8_lm_head=True) for name, kw in list(variants.items())})
    if args.compare_unfused:
        variants["te_unfused"] = dict(fused=False)
    if args.compare_te_norms:
        variants["te_te_norms"] = dict(fused_norms=False)
    for name, kw in variants.items():
        try:
            results[name] = run_variant(out, name, load_te_model(ckpt, torch.bfloat16, "cuda", **kw), te16_step, kv16,
                                        batches, args.prompt, args.new, args.profile)
        except Exception as e:  # noqa: BLE001
            emit(out, kind="error", section=name, error=repr(e))
        torch.cuda.empty_cache()

    if args.hf_compile:
        for b in batches:
            try:
                t0 = time.perf_counter()
                hf_generate_time(hf, b, args.prompt, 4, cache_implementation="static")
                compile_s = time.perf_counter() - t0
                results["hf_compile"][b] = emit(out, kind="hf_compile", batch=b, first_call_s=compile_s,
                                                **hf_decode(hf, b, args.prompt, args.new,
                                                            cache_implementation="static"))
            except Exception as e:  # noqa: BLE001
                emit(out, kind="error", section="hf_compile", batch=b, error=repr(e))

    summary = {"kind": "summary", "gpu": gpu_name(), "hbm_datasheet_TBs": hbm / 1e12,
               "floor_ms": 1e3 * weight_bytes / hbm}
    te_b = results["te_bf16"]
    for b in batches:
        row = {}
        if b in te_b:
            row["te_tok_s"] = round(te_b[b]["decode_tok_s"])
            row["te_forward_gpu_ms"] = round(te_b[b]["forward_gpu_ms"], 3)
        if b in results["hf_eager"] and b in te_b:
            row["hf_eager_tok_s"] = round(results["hf_eager"][b]["decode_tok_s"])
            row["te_over_hf_eager"] = round(te_b[b]["decode_tok_s"] / results["hf_eager"][b]["decode_tok_s"], 2)
        if b in results["hf_compile"] and b in te_b:
            row["te_over_hf_compile"] = round(te_b[b]["decode_tok_s"] / results["hf_compile"][b]["decode_tok_s"], 2)
        for name in variants:  # >1: the variant is faster than te_bf16
            if b in results.get(name, {}) and b in te_b:
                v = results[name][b]
                row[f"{name}_tok_s"] = round(v["decode_tok_s"])
                row[f"{name}_speedup_forward"] = round(te_b[b]["forward_gpu_ms"] / v["forward_gpu_ms"], 2)
                row[f"{name}_speedup_loop"] = round(v["decode_tok_s"] / te_b[b]["decode_tok_s"], 2)
        summary[f"batch{b}"] = row
    if 1 in te_b:
        summary["batch1_forward_over_floor"] = round(te_b[1]["forward_gpu_ms"] / summary["floor_ms"], 2)
        summary["batch1_step_over_floor"] = round(te_b[1]["step_ms"] / summary["floor_ms"], 2)
    emit(out, **summary)


if __name__ == "__main__":
    main()
