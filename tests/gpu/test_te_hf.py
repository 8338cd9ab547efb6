"""TEGemmaDecoderLayer outside our engine: as a drop-in for HF's GemmaDecoderLayer (TE's own
attention and RoPE), and with TE's own paged KV cache (InferenceParams)."""
import copy
from collections import OrderedDict

import pytest
import torch

from tests.gpu.helpers import DEVICE, SeqRun, drive, greedy_agreement, prompts_for, rel_err, report, requires_te

pytestmark = [pytest.mark.gpu, requires_te]

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TIE = {"bf16": 0.1, "fp32": 0.01}


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=n, do_sample=False,
                         use_cache=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    run = SeqRun(prompt, 0, n)
    run.tokens = out.sequences[0, len(prompt):].tolist()
    run.logits = [s[0].float().cpu() for s in out.scores]
    return run


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_dropin_generates_hf_tokens(dtype):
    from backend.te.layers import TEGemmaDecoderLayer, use_te_layers_in_hf
    from tests.gpu.helpers import tiny_hf

    hf = tiny_hf("gemma", seed=11).to(DEVICE, DTYPES[dtype])
    hf.generation_config.eos_token_id = None  # random weights: do not stop early
    te_hf = copy.deepcopy(hf)
    use_te_layers_in_hf(te_hf)
    assert all(isinstance(layer, TEGemmaDecoderLayer) for layer in te_hf.model.layers)
    prompt = prompts_for(hf.config.vocab_size, [12], seed=12)[0]
    with torch.no_grad():
        ids = torch.tensor([prompt], device=DEVICE)
        err = rel_err(te_hf(ids, use_cache=False).logits.float(), hf(ids, use_cache=False).logits.float())
        want, got = hf_greedy(hf, prompt, 32), hf_greedy(te_hf, prompt, 32)
    equal = greedy_agreement(want, got, TIE[dtype], f"HF drop-in {dtype}")
    report(test="hf_dropin", dtype=dtype, logits_rel_err=err, equal_tokens=equal, of=32)
    assert err < (5e-3 if dtype == "fp32" else 3e-2)


@pytest.mark.parametrize("family", ["gemma", "gemma3_text"])
def test_te_inference_params_paged_cache(family, tmp_path):
    """The same layers generating through TE's InferenceParams (paged, TE's attention backends)
    instead of the engine's cache: same greedy tokens as the engine path."""
    import transformer_engine.pytorch as te

    from backend.te.runner import load_te_model
    from tests.gpu.helpers import save_tiny

    dtype = torch.bfloat16
    path = save_tiny(tmp_path, family, seed=13)
    model = load_te_model(path, dtype, DEVICE)
    cfg = model.cfg
    prompt, n, page = prompts_for(cfg.vocab_size, [21], seed=14)[0], 24, 16
    want = drive(model, cfg, [prompt], n, dtype)[0]

    max_len = 64
    params = te.InferenceParams(max_batch_size=1, max_sequence_length=max_len, num_heads_kv=cfg.num_kv_heads,
                                head_dim_k=cfg.head_dim, dtype=dtype, is_paged=True,
                                total_num_pages=max_len // page, page_size=page, qkv_format="bshd")
    got = SeqRun(prompt, 0, n)
    step_ids = prompt
    with torch.no_grad():
        while not got.done:
            params.pre_step(OrderedDict([(0, len(step_ids))]))
            x = model.embed_tokens(torch.tensor([step_ids], device=DEVICE))
            for layer in model.layers:
                x = layer(x, self_attn_mask_type="padding_causal", inference_params=params)
            logits = model.logits(model.final_norm(x[0, -1:]))[0].float().cpu()
            got.logits.append(logits)
            got.tokens.append(int(logits.argmax()))
            step_ids = [got.tokens[-1]]
    equal = greedy_agreement(want, got, TIE["bf16"], f"{family} TE InferenceParams")
    report(test="te_inference_params", family=family, equal_tokens=equal, of=n)
