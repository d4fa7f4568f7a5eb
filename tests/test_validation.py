"""Bad input gets a clear Python error that names the argument."""
import pytest
import torch

from inductor_flex import FlexModError, create_block_mask, flex_attention
from inductor_flex.variants import generate_causal_mask


def qkv(B=1, H=2, L=16, E=8, dtype=torch.float32, Hkv=None, Lkv=None, Ek=None, Ev=None):
    q = torch.randn(B, H, L, E, dtype=dtype)
    k = torch.randn(B, Hkv or H, Lkv or L, Ek or E, dtype=dtype)
    v = torch.randn(B, Hkv or H, Lkv or L, Ev or E, dtype=dtype)
    return q, k, v


def causal_if(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return torch.tensor(True)
    return torch.tensor(False)


def not_mask(b, h, q_idx, kv_idx):
    return not (q_idx < kv_idx)


def item_mod(score, b, h, q_idx, kv_idx):
    return score * q_idx.item()


def wrong_shape(score, b, h, q_idx, kv_idx):
    return torch.stack([score, score])


def int_mask(b, h, q_idx, kv_idx):
    return q_idx - kv_idx


CASES = {
    "batch_mismatch": (lambda: (torch.randn(2, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)), {}, ValueError, "batch sizes differ"),
    "heads_need_gqa": (lambda: qkv(H=4, Hkv=2), {}, ValueError, "enable_gqa=True"),
    "heads_not_multiple": (lambda: qkv(H=3, Hkv=2), {"enable_gqa": True}, ValueError, "multiple"),
    "E_mismatch": (lambda: qkv(E=8, Ek=16), {}, ValueError, "head dims differ"),
    "mixed_dtypes": (lambda: (torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4).half(), torch.randn(1, 1, 4, 4)), {}, TypeError, "share one dtype"),
    "int_dtype": (lambda: tuple(torch.ones(1, 1, 4, 4, dtype=torch.int32) for _ in range(3)), {}, TypeError, "query must be float16"),
    "not_4d": (lambda: (torch.randn(2, 4, 4), torch.randn(2, 4, 4), torch.randn(2, 4, 4)), {}, ValueError, "query must be 4-D"),
    "zero_size": (lambda: qkv(L=0), {}, ValueError, "zero-size"),
    "kv_len_mismatch": (lambda: (torch.randn(1, 1, 4, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 6, 4)), {}, ValueError, "same sequence length"),
    "score_mod_arity": (lambda: qkv(), {"score_mod": lambda s, b, h: s}, FlexModError, "must take 5 arguments"),
    "score_mod_wrong_shape": (lambda: qkv(), {"score_mod": wrong_shape}, FlexModError, "0-d tensor"),
    "score_mod_item": (lambda: qkv(), {"score_mod": item_mod}, FlexModError, ".item()"),
    "unknown_kernel_option": (lambda: qkv(), {"kernel_options": {"BLOK_M": 64}}, ValueError, "unknown key 'BLOK_M'"),
    "bad_backend": (lambda: qkv(), {"kernel_options": {"BACKEND": "CUDNN"}}, ValueError, "BACKEND"),
    "bad_block_m": (lambda: qkv(), {"kernel_options": {"BLOCK_M": 48}}, ValueError, "power of two"),
    "bad_scale": (lambda: qkv(), {"scale": float("nan")}, ValueError, "scale"),
    "block_mask_type": (lambda: qkv(), {"block_mask": torch.ones(16, 16, dtype=torch.bool)}, TypeError, "block_mask must be a BlockMask"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_clear_error(name):
    make, kwargs, exc, text = CASES[name]
    q, k, v = make()
    with pytest.raises(exc, match=None) as info:
        flex_attention(q, k, v, **kwargs)
    assert text in str(info.value), str(info.value)


@pytest.mark.parametrize("mask_mod,text", [(causal_if, "torch.where"), (not_mask, "torch.where"), (int_mask, "must return a bool")],
                         ids=["if_on_tensor", "not_on_tensor", "int_mask"])
def test_bad_mask_mod(mask_mod, text):
    with pytest.raises(FlexModError) as info:
        create_block_mask(mask_mod, None, None, 16, 16, device="cpu", BLOCK_SIZE=8)
    assert text in str(info.value)


def test_mask_mod_arity():
    with pytest.raises(FlexModError, match="must take 4 arguments"):
        create_block_mask(lambda b, h, q: q > 0, None, None, 16, 16, device="cpu")


def test_block_mask_for_other_lengths():
    bm = create_block_mask(generate_causal_mask(), None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    q, k, v = qkv(L=100)
    with pytest.raises(ValueError, match="block_mask was built for Q_LEN=64, KV_LEN=64"):
        flex_attention(q, k, v, block_mask=bm)


def test_block_mask_wrong_batch_or_heads():
    bm = create_block_mask(generate_causal_mask(), 3, None, 16, 16, device="cpu", BLOCK_SIZE=16)
    q, k, v = qkv(B=2)
    with pytest.raises(ValueError, match="batch size 3"):
        flex_attention(q, k, v, block_mask=bm)


@pytest.mark.parametrize("bs", [0, -16, (16,), (16, 0), 1.5, "128"], ids=str)
def test_bad_block_size(bs):
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        create_block_mask(generate_causal_mask(), None, None, 16, 16, device="cpu", BLOCK_SIZE=bs)


def test_mixed_devices_and_block_mask_device():
    if not torch.cuda.is_available():
        # a "meta" tensor is a different device without needing a GPU
        q = torch.randn(1, 1, 4, 4)
        k = torch.empty(1, 1, 4, 4, device="meta")
        with pytest.raises(ValueError, match="one device"):
            flex_attention(q, k, k)
        bm = create_block_mask(generate_causal_mask(), None, None, 4, 4, device="meta", BLOCK_SIZE=4)
        with pytest.raises(ValueError, match="block_mask is on meta"):
            flex_attention(q, q, q, block_mask=bm)
    else:
        q = torch.randn(1, 1, 4, 4)
        with pytest.raises(ValueError, match="one device"):
            flex_attention(q, q.cuda(), q)


def test_return_lse_and_aux_together():
    from inductor_flex import AuxRequest

    q, k, v = qkv()
    with pytest.raises(ValueError, match="not both"):
        flex_attention(q, k, v, return_lse=True, return_aux=AuxRequest(lse=True))


def test_unsupported_op_in_kernel_names_op_and_mod():
    q, k, v = qkv(E=16)

    def uses_cumsum(score, b, h, q_idx, kv_idx):
        return score + torch.atan2(score, score)

    with pytest.raises(FlexModError) as info:
        flex_attention(q, k, v, score_mod=uses_cumsum, kernel_options={"BACKEND": "TRITON"})
    assert "atan2" in str(info.value) and "uses_cumsum" in str(info.value)




@pytest.mark.parametrize("mod", [item_mod], ids=["item"])
def test_kernel_path_explains_python_values(mod):
    q, k, v = qkv(E=16)
    with pytest.raises(FlexModError, match="torch.where"):
        flex_attention(q, k, v, score_mod=mod, kernel_options={"BACKEND": "TRITON"})


def test_block_mask_for_longer_sequence_same_block_count():
    bm = create_block_mask(generate_causal_mask(), None, None, 100, 100, device="cpu", BLOCK_SIZE=128)
    q, k, v = qkv(L=120)
    with pytest.raises(ValueError, match="built for Q_LEN=100"):
        flex_attention(q, k, v, block_mask=bm)


@pytest.mark.parametrize("dtype,opts,on_gpu,expected", [
    (torch.bfloat16, {}, True, True), (torch.float16, {}, True, True), (torch.float32, {}, True, False),
    (torch.bfloat16, {"FAST_TANH": False}, True, False), (torch.float32, {"FAST_TANH": True}, True, True),
    (torch.bfloat16, {"FAST_TANH": True}, False, False),
], ids=["bf16", "fp16", "fp32", "bf16_off", "fp32_on", "interpreter"])
def test_fast_tanh_default(dtype, opts, on_gpu, expected):
    # the hardware tanh: default for 16-bit GPU inputs, opt-in for float32, never without PTX
    from inductor_flex.validation import use_fast_tanh

    assert use_fast_tanh(opts, dtype, on_gpu) is expected
