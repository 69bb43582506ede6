"""The bytes table's rows against the real models' shapes, worked by hand here (not with
peftcore.storage's formula) so a wrong shape or a wrong formula fails.

LoRA rank r on a d_in -> d_out projection trains r * (d_in + d_out) parameters; at 16 bits
each costs 2 bytes. Sources: each model's config.json on the Hugging Face hub (Llama 2) and
the GPT-3 paper's Table 2.1, as cited in peftcore/storage.py."""
from peftcore.storage import KNOWN_BASES

R = 4


def test_llama2_7b_row():
    # 32 layers; q: 4096 -> 4096; v: 4096 -> 4096 (32 k/v heads of 128: no GQA)
    # per layer 4 * 8192 + 4 * 8192 = 65,536; * 32 = 2,097,152 params; * 2 bytes
    assert KNOWN_BASES["LLaMA-2 7B"].lora_qv_bytes(R) == 4_194_304


def test_llama2_70b_row_counts_grouped_query_attention():
    # 80 layers; q: 8192 -> 8192; v: 8192 -> 1024 (8 k/v heads of 128)
    # per layer 4 * 16384 + 4 * 9216 = 65,536 + 36,864 = 102,400; * 80 = 8,192,000 params
    b = KNOWN_BASES["LLaMA-2 70B"]
    assert b.kv_width == 1024
    assert b.lora_qv_bytes(R) == 16_384_000  # not 20,971,520: v is not 8192 wide


def test_gpt3_175b_row():
    # 96 layers; q and v: 12288 -> 12288 (96 heads of 128, no GQA)
    # per layer 2 * 4 * 24576 = 196,608; * 96 = 18,874,368 params: the LoRA paper's "35MB"
    # checkpoint for r=4 on q and v (Hu et al. 2021), 37.7 MB = 36 MiB at 2 bytes
    assert KNOWN_BASES["GPT-3 175B"].lora_qv_bytes(R) == 37_748_736


def test_llama2_parameter_counts_follow_from_their_shapes():
    # embed + lm_head (vocab 32000, untied) + layers * (attention + gated MLP + 2 norms) + final norm
    d, ff = 4096, 11008
    assert 2 * 32000 * d + 32 * (4 * d * d + 3 * d * ff + 2 * d) + d == KNOWN_BASES["LLaMA-2 7B"].params
    d, kv, ff = 8192, 1024, 28672
    attention = 2 * d * d + 2 * d * kv  # q, o full width; k, v 1024 wide
    assert 2 * 32000 * d + 80 * (attention + 3 * d * ff + 2 * d) + d == KNOWN_BASES["LLaMA-2 70B"].params


def test_every_known_base_is_checked_here():
    assert set(KNOWN_BASES) == {"LLaMA-2 7B", "LLaMA-2 70B", "GPT-3 175B"}  # a new row needs its test
