import json
import math

from dcal_lib.bench import main

FIELDS = set("""
backbone img_size batch steps warmup depth device dtype grad_ckpt threads load_avg cpu_count workers mem_kind
clock
train_s_plain train_s_dcal train_s_glca train_s_pwca train_ratio_plain train_ratio_dcal train_ratio_glca
train_ratio_pwca embed_s_plain embed_s_dcal embed_ratio mem_mib_plain mem_mib_dcal mem_ratio gflops_plain
gflops_dcal flops_ratio images_s_plain images_s_dcal gpu_peak_frac_plain gpu_peak_frac_dcal peak_tflops
rollout_s rollout_pct_train data_images_s_per_worker data_images_s images_s_needed
data_keeps_up""".split())


def hand_train_flops(dim: int, patches: int, depth: int, pwca: bool, glca_queries: int) -> float:
    """Matmul FLOPs of one training image by the cost model: linear layers 3x their forward (input and
    weight gradients), attention 3.5x (its backward recomputes the scores: 5 matmuls for 2), the patch
    embedding 2x (no gradient into the image), the no-grad rollout inputs 1x."""
    n = patches + 1
    lin = lambda tokens, fan_in, fan_out: 2 * tokens * fan_in * fan_out  # noqa: E731
    block_linear = lin(n, dim, 3 * dim) + lin(n, dim, dim) + lin(n, dim, 4 * dim) + lin(n, 4 * dim, dim)
    attn = lambda queries, keys: 4 * queries * keys * dim  # noqa: E731  # q·kᵀ and p·v
    flops = 2 * lin(patches, 3 * 16 * 16, dim) + depth * (3 * block_linear + 3.5 * attn(n, n))
    if pwca:  # a second token stream through every block; its keys/values are [own; partner's]
        flops += depth * (3 * block_linear + 3.5 * attn(n, 2 * n))
    if glca_queries:  # q on the selected tokens, k/v on all; rollout q·kᵀ on the first depth-1 blocks
        q = glca_queries
        flops += 3 * (lin(q, dim, dim) + lin(n, dim, 2 * dim) + lin(q, dim, dim) + lin(q, dim, 4 * dim)
                      + lin(q, 4 * dim, dim)) + 3.5 * attn(q, n)
        flops += (depth - 1) * 2 * n * n * dim
    return flops


def test_bench_table_on_a_tiny_vit(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--backbone", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "2", "--batch", "4",
                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert set(table) == FIELDS
    assert "images/s needed = batch / DCAL step time" in capsys.readouterr().out
    for key in ("train_ratio_dcal", "train_ratio_glca", "train_ratio_pwca", "embed_ratio", "mem_ratio",
                "flops_ratio", "data_images_s_per_worker", "images_s_needed", "rollout_pct_train"):
        assert math.isfinite(table[key]) and table[key] > 0, key
    assert table["device"] == "cpu" and table["dtype"] == "float32" and table["gpu_peak_frac_dcal"] is None
    # 32 px / 16 = 2x2 patches; GLCA queries CLS + ceil(0.1 * 4) patches
    plain = hand_train_flops(192, 4, 2, pwca=False, glca_queries=0)
    dcal = hand_train_flops(192, 4, 2, pwca=True, glca_queries=2)
    assert math.isclose(table["gflops_plain"] * 1e9, plain, rel_tol=2e-3)  # attention alone is 0.5 %
    assert math.isclose(table["gflops_dcal"] * 1e9, dcal, rel_tol=2e-3)
    assert 1.5 < table["flops_ratio"] < 3.5
    assert table["data_keeps_up"] == (table["data_images_s"] >= table["images_s_needed"])
