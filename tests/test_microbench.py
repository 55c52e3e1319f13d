"""The microbenchmark CLI: argument handling, the CPU path end to end, the JSON
schema, the byte and bandwidth arithmetic, and that a wrong result is a FAIL row."""

import csv
import json
import math
import shlex

import pytest
import torch

import microbench.baselines
from microbench import presets, roofline, timing
from microbench.case import Impl
from microbench.cli import build_parser, main
from microbench.runner import ROW_KEYS, run_case
from microbench.suites import (SUITES, _common, _tree, block_attention, build_tree, copy_kv,
                               fuse_target_features, module, tree_mask, verify_chain, verify_tree,
                               write_kv)

TINY = ["--preset", "tiny", "--device", "cpu", "--reps", "2", "--max-seconds", "0.01", "--quiet"]
CPU = torch.device("cpu")


# ------------------------------------------------------------------ arguments

@pytest.mark.parametrize(
    "argv, message",
    [
        (["nosuch"], "invalid choice"),
        (["verify_chain", "--ops", "block_attention"], "--ops: unknown for verify_chain"),
    ] + [(["block_attention"] + args.split(), message) for args, message in [
        ("--shape hq=abc", "hq expects an integer"),
        ("--shape heads=4", "unknown key 'heads'"),
        ("--shape hq", "expected key=value"),
        ("--shape hq=6,hkv=4", "multiple of hkv"),
        ("--shape d=96", "d must be one of"),
        ("--shape cache=int4", "cache must be one of"),
        ("--shape s=1", "s (block size) must be >= 2"),
        ("--preset nosuch", "unknown preset 'nosuch'"),
        ("--backends cudnn", "--backends: unknown cudnn"),
        ("--modes greedy", "--modes: expected some of none"),
        ("--batch 0", "integers >= 1"),
        ("--ctx 1k", "comma-separated integers"),
    ]],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main(argv + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_plot_without_matplotlib_is_a_clean_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("microbench.cli.have_matplotlib", lambda: "--plot needs matplotlib (test)")
    assert main(["verify_chain", "--plot", str(tmp_path / "p.png")] + TINY) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    assert main(["verify_chain", "--modes", "greedy", "--batch", "1,2", "--ctx", "4", "--plot", str(path)]
                + TINY) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shape_overrides_apply_over_the_preset():
    shape = presets.resolve("qwen3-8b", presets.parse_shape_overrides("page=1, window=64,cache=fp8_e5m2"))
    assert (shape.page, shape.window, shape.cache, shape.hq, shape.v) == (1, 64, "fp8_e5m2", 32, 151936)
    assert shape.name == "qwen3-8b+custom"


# ------------------------------------------------------------------ CPU end to end

# The tree suites run at N = 16 only here (their N = 32..128 rows: test_tree_suites_*).
RUN_MODES = ("greedy", "sampled", "n16", "greedy-n16", "sampled-n16")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["all", "--batch", "2", "--ctx", "9", "--json", str(out / "r.json"), "--csv",
            str(out / "r.csv"), "--show-commands", "--modes", ",".join(RUN_MODES)] + TINY
    code = main(argv)
    with open(out / "r.json") as f:
        doc = json.load(f)
    with open(out / "r.csv") as f:
        table = list(csv.DictReader(f))
    return code, doc, table


def test_tiny_cpu_run_succeeds_and_covers_every_op(tiny_run):
    code, doc, _ = tiny_run
    assert code == 0
    rows = doc["rows"]
    seen = {(r["suite"], r["op"], r["mode"]) for r in rows}
    want = {(s, op, mode) for s in SUITES for op in module(s).OPS
            for mode in getattr(module(s), "MODES", ("",)) if not mode or mode in RUN_MODES}
    assert seen == want
    assert {"verify_tree", "tree_mask", "copy_kv"} <= {s for s, _, _ in seen}
    assert ("block_attention", "tree", "") in seen
    # FlashInfer's sampler rows (verify_chain's sampled modes) SKIP here: not installed, or CPU.
    skipped = [r for r in rows if r["status"] == "SKIP"]
    assert {(r["suite"], r["impl"]) for r in skipped} <= {("verify_chain", "flashinfer")}
    assert all(r["error"] for r in skipped)
    rows = [r for r in rows if r["status"] != "SKIP"]
    assert all(r["status"] == "OK" for r in rows), [(r["op"], r["impl"], r["check"]) for r in rows]
    # The PyTorch composition runs for every op that has one, and is checked against the reference.
    for key in {k for k in want if not k[2].startswith("sampled")}:
        torch_rows = [r for r in rows if (r["suite"], r["op"], r["mode"], r["impl"]) == key + ("torch",)]
        assert len(torch_rows) == 1
        assert torch_rows[0]["check"] == "vs reference"
        assert torch_rows[0]["speedup_vs_torch"] == pytest.approx(1.0)
    # Without --interpret the CPU run never uses the Triton backend.
    assert not [r for r in rows if r["impl"] == "triton"]


def test_json_schema(tiny_run):
    _, doc, _ = tiny_run
    assert doc["schema"] == "dflash-microbench/1"
    assert doc["device"]["type"] == "cpu" and doc["device"]["cpu_timings"] is True
    assert doc["device"]["copy_gbps"] > 0
    assert doc["dtype"] == "fp16"
    for r in doc["rows"]:
        assert set(r) == set(ROW_KEYS)
        assert r["preset"] == "tiny" and r["batch"] == 2 and r["ctx"] == 9
        assert r["kind"] in ("ours", "baseline")
        if r["status"] == "SKIP":     # FlashInfer's sampler rows: not timed
            assert r["impl"] == "flashinfer" and r["time_ms"] is None
            continue
        assert r["time_ms"] > 0 and r["min_ms"] <= r["time_ms"] <= r["max_ms"]
        assert r["timing"] == "cpu" and r["runs"] >= 3 and r["copies"] == 1
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["time_ms"] * 1e-3) / 1e9)
        assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / doc["device"]["copy_gbps"])
        assert r["shape"] == presets.PRESETS["tiny"].as_dict()


def test_csv_has_one_line_per_row(tiny_run):
    _, doc, table = tiny_run
    assert len(table) == len(doc["rows"])
    assert [t["impl"] for t in table] == [r["impl"] for r in doc["rows"]]
    assert float(table[0]["time_ms"]) == pytest.approx(doc["rows"][0]["time_ms"])


def test_row_bytes_follow_the_roofline_formulas(tiny_run):
    _, doc, _ = tiny_run
    t = presets.PRESETS["tiny"]
    by_op = {(r["op"], r["mode"]): r["bytes"] for r in doc["rows"]}
    assert by_op[("block_attention", "")] == roofline.attention_bytes(
        batch=2, s=t.s, hq=t.hq, hkv=t.hkv, d=t.d, ctx=9, page=t.page, act=2, cache_elt=2)
    assert by_op[("verify_chain", "greedy")] == roofline.verify_bytes(
        batch=2, s=t.s, v=t.v, logits_elt=4, token_elt=4, seq_lens=True)
    assert by_op[("tree", "")] == roofline.attention_bytes(
        batch=2, s=t.s, hq=t.hq, hkv=t.hkv, d=t.d, ctx=9, page=t.page, act=2, cache_elt=2,
        mask_bits=True)
    assert by_op[("verify_tree", "greedy-n16")] == roofline.verify_tree_bytes(
        batch=2, n=16, v=t.v, logits_elt=4, token_elt=4, seq_lens=True)
    assert by_op[("tree_mask", "n16")] == roofline.tree_mask_bytes(batch=2, n=16)
    kept = int(copy_kv.paths(2, 16, 0)[1].sum())
    assert by_op[("copy_kv", "n16")] == roofline.copy_kv_bytes(
        m=32, kept=kept, layers=t.layers, hkv=t.hkv, d=t.d, cache_elt=2)
    n_valid = int(_common.committed(t, 2, 0).sum())
    assert 2 <= n_valid <= 2 * t.s
    assert by_op[("write_kv", "")] == roofline.write_kv_bytes(
        n=2 * t.s, n_valid=n_valid, layers=t.layers, hkv=t.hkv, d=t.d, act=2, cache_elt=2,
        rotary_dim=t.d, norm_elt=2)


def test_each_row_has_a_command_that_reproduces_it(tiny_run, tmp_path):
    _, doc, _ = tiny_run
    row = next(r for r in doc["rows"] if r["mode"] == "greedy" and r["impl"] == "torch")
    argv = shlex.split(row["command"])
    assert argv[:3] == ["python", "-m", "microbench"]
    args = build_parser().parse_args(argv[3:])
    assert (args.suite, args.preset, args.ops, args.modes, args.batch, args.ctx, args.backends) == (
        "verify_chain", ["tiny"], ["verify_chain"], ["greedy"], [2], [9], ["torch"])
    out = tmp_path / "again.json"
    assert main(argv[3:] + ["--json", str(out), "--reps", "2", "--quiet"]) == 0
    again = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["mode"], r["impl"], r["batch"], r["ctx"], r["status"]) for r in again] == [
        ("verify_chain", "greedy", "torch", 2, 9, "OK")]


def test_cpu_run_prints_the_cpu_banner_and_a_table(capsys):
    assert main(["verify_chain", "--modes", "greedy", "--batch", "1", "--ctx", "4"] + TINY) == 0
    out = capsys.readouterr().out
    assert "CPU timings" in out and "say nothing about" in out
    header = next(line for line in out.splitlines() if line.startswith("suite/op"))
    assert header.split()[:6] == ["suite/op", "preset", "B", "ctx", "impl", "status"]
    assert "verify_chain[greedy]" in out


def test_interpret_runs_the_triton_backend_on_cpu(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter is chosen when Triton kernels are imported; this process compiles them")
    monkeypatch.setenv("TRITON_INTERPRET", "1")      # restored after the test (main sets it too)
    out = tmp_path / "r.json"
    code = main(["verify_chain", "--modes", "greedy", "--batch", "1", "--ctx", "4", "--interpret",
                 "--json", str(out)] + TINY)
    rows = json.loads(out.read_text())["rows"]
    triton_rows = [r for r in rows if r["impl"] == "triton"]
    if not triton_rows:
        pytest.skip("the Triton backend of verify_chain is not importable here")
    assert code == 0
    assert triton_rows[0]["status"] == "OK" and triton_rows[0]["check"] == "vs reference"
    assert "--interpret" in triton_rows[0]["command"]


def test_custom_shape_reaches_rows_and_commands(tmp_path):
    out = tmp_path / "r.json"
    assert main(["block_attention", "--shape", "window=5,cache=fp8_e4m3", "--batch", "2", "--ctx", "11",
                 "--json", str(out)] + TINY) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["status"] for r in rows} == {"OK"}
    assert {r["preset"] for r in rows} == {"tiny+custom"}
    assert all("--shape window=5,cache=fp8_e4m3" in r["command"] for r in rows)
    assert rows[0]["bytes"] == roofline.attention_bytes(
        batch=2, s=4, hq=4, hkv=2, d=64, ctx=11, page=4, act=2, cache_elt=1, window=5, fp8_scales=True)


# ------------------------------------------------------------------ wrong results are FAIL rows

def _case(suite, op, batch=2, ctx=9):
    return suite.build_case(op, presets.PRESETS["tiny"], batch, ctx, "fp16", CPU)


@pytest.mark.parametrize(
    "suite, op, corrupt",
    [
        (block_attention, "block_attention", lambda out: out * 1.5),
        (block_attention, "block_attention", None),        # leaves the output buffer unwritten
        (write_kv, "write_kv", lambda caches: tuple(c.clone().fill_(0) for c in caches)),
        (fuse_target_features, "fuse_target_features", lambda out: out + 0.1),
        (verify_chain, "verify_chain", lambda outs: (outs[0] + 1,) + tuple(outs[1:])),  # greedy
        (verify_tree, "verify_tree", lambda outs: (outs[0], outs[1] + 1) + tuple(outs[2:])),
        (tree_mask, "tree_mask", lambda outs: (outs[0] ^ 4, outs[1])),
        (copy_kv, "copy_kv", lambda caches: (caches[0].clone().fill_(0), caches[1])),
        (build_tree, "build_tree", lambda outs: (outs[0], outs[1], outs[2], outs[3] + 1)),
        (block_attention, "tree", lambda out: out + 0.1),
    ],
)
def test_a_wrong_backend_is_marked_fail_and_not_timed(suite, op, corrupt):
    case = _case(suite, op)
    good = case.oracle
    assert good is not None

    def wrong(inp):
        if corrupt is None:
            return inp["out"]
        return corrupt(good.fn(inp))

    case.impls.append(Impl("cuda", "ours", wrong))
    rows = run_case(case, CPU, copy_gbps=10.0, reps=2, max_seconds=0.01)
    by_impl = {r["impl"]: r for r in rows}
    bad = by_impl["cuda"]
    assert bad["status"] == "FAIL" and bad["time_ms"] is None
    assert bad["check"].startswith(f"vs {good.name}: ")
    assert all(r["status"] == "OK" for r in rows if r["impl"] != "cuda")


# ------------------------------------------------------------------ the tree suites' N sweep

@pytest.mark.parametrize("suite", [verify_tree, tree_mask, copy_kv, build_tree])
def test_tree_suites_sweep_16_to_128_nodes(suite):
    t = presets.PRESETS["tiny"]
    modes = suite.MODES
    assert sorted({_tree.nodes_of(m) for m in modes}) == [16, 32, 64, 128]
    for mode in modes:
        n = _tree.nodes_of(mode)
        case = suite.build_case(suite.OPS[0], t, 2, 9, "fp16", CPU, mode=mode)
        assert case.extra["n_nodes"] == n and case.extra["launches"] == suite.LAUNCHES
        if suite is verify_tree:
            want = roofline.verify_tree_bytes(batch=2, n=n, v=t.v, logits_elt=4, token_elt=4,
                                              sampled=mode.startswith("sampled"), seq_lens=True)
        elif suite is tree_mask:
            want = roofline.tree_mask_bytes(batch=2, n=n)
        elif suite is build_tree:
            want = roofline.build_tree_bytes(batch=2, d=t.s - 1, v=t.v, n=n, logits_elt=4)
        else:
            want = roofline.copy_kv_bytes(m=2 * n, kept=case.extra["kept"], layers=t.layers,
                                          hkv=t.hkv, d=t.d, cache_elt=2)
        assert case.nbytes == want
        if "torch_ops" in case.extra:      # the baseline: device ops only, no host sync
            assert case.extra["torch_ops"] > 0 and case.extra["torch_host_syncs"] == 0
    assert suite.LAUNCHES == {"triton": 2 if suite in (verify_tree, build_tree) else 1}


@pytest.mark.parametrize("suite, mode", [(verify_tree, "greedy-n128"), (tree_mask, "n128"),
                                         (copy_kv, "n128"), (tree_mask, "n32"),
                                         (build_tree, "n128"), (build_tree, "n16")])
def test_tree_baselines_match_the_reference_at_large_n(suite, mode):
    case = suite.build_case(suite.OPS[0], presets.PRESETS["tiny"], 3, 9, "fp16", CPU, mode=mode)
    torch_impl = next(i for i in case.impls if i.name == "torch")
    assert case.oracle.name == "reference"
    inp = case.make_inputs()
    fresh = {k: v.clone() for k, v in inp.items() if k in case.mutable}
    want = [t.clone() for t in case.oracle.fn(inp)]
    inp.update({k: v.clone() for k, v in fresh.items()})
    ok, _, msg = case.compare(torch_impl.fn(inp), want)
    assert ok, msg
    if suite is verify_tree:     # the case exercises the walk: some requests accept nodes
        assert int(want[0].max()) >= 1
    if suite is build_tree:      # every slot used, some nodes deeper than 1
        assert (want[2] == case.extra["n_nodes"]).all() and int(want[3].max()) >= 2


def test_copy_kv_case_is_an_accepted_path():
    nodes, a = copy_kv.paths(4, 64, 0)
    for b in range(4):
        path = nodes[b, : int(a[b])].tolist()
        assert path == sorted(path) and all(x > 0 for x in path)
        assert (nodes[b, int(a[b]):] == -1).all()


def test_a_raising_backend_is_an_error_row_not_a_crash():
    case = _case(verify_chain, "verify_chain", batch=1)

    def boom(inp):
        raise RuntimeError("kernel exploded")

    case.impls.insert(0, Impl("triton", "ours", boom))
    rows = run_case(case, CPU, copy_gbps=10.0, reps=2, max_seconds=0.01)
    assert rows[0]["status"] == "ERROR" and "kernel exploded" in rows[0]["error"]
    assert rows[1]["status"] == "OK"


def test_main_exits_1_when_a_row_fails(monkeypatch, tmp_path):
    def wrong_verify(inp):
        a, o, b = real(inp)
        return a, o, b + 1
    real = microbench.baselines.torch_verify_greedy
    monkeypatch.setattr(microbench.baselines, "torch_verify_greedy", wrong_verify)
    out = tmp_path / "r.json"
    assert main(["verify_chain", "--modes", "greedy", "--batch", "2", "--ctx", "4", "--json", str(out)]
                + TINY) == 1
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torch"]["status"] == "FAIL" and "ids differ" in rows["torch"]["check"]
    assert rows["reference"]["status"] == "OK"


# ------------------------------------------------------------------ arithmetic

def test_attention_bytes_by_hand():
    # q 2*4*8*64*2 = 8192, context K+V 2*2*100*2*64*2 = 102400, block K+V 2*2*4*2*64*2 = 4096,
    # table 2*ceil(100/16)*4 = 56 plus context_lens 8, out 8192.
    kw = dict(batch=2, s=4, hq=8, hkv=2, d=64, ctx=100, page=16, act=2, cache_elt=2)
    assert roofline.attention_bytes(**kw) == 8192 + 102400 + 4096 + 64 + 8192
    # window 10: 9 context keys visible: K+V 2*2*9*2*64*2 = 9216, table 2*1*4 + 8.
    assert roofline.attention_bytes(window=10, **kw) == 8192 + 9216 + 4096 + 16 + 8192
    # A packed tree mask: 2*4*1 words of 4 bytes.
    assert roofline.attention_bytes(mask_bits=True, **kw) == 122944 + 32
    # lse 2*4*8*4 = 256; fp8 cache halves the context K/V and adds two fp32 scales.
    assert roofline.attention_bytes(lse=True, **kw) == 122944 + 256
    kw["cache_elt"] = 1
    assert roofline.attention_bytes(fp8_scales=True, **kw) == 122944 - 51200 + 8


def test_injection_bytes_by_hand():
    # features 3*16*2 = 96, fc 8*16*2 = 256, norm 8*4 = 32, out 3*8*2 = 48.
    assert roofline.fuse_bytes(n=3, h=8, k=2, act=2, norm_elt=4) == 432
    # slots 4*8 = 32; per valid token: k+v 16*2, position 8, cos/sin 4*4, cache 16*1 -> 3*72;
    # k_norm 2*4*2 = 16.
    kw = dict(n=4, n_valid=3, layers=2, hkv=1, d=4, rotary_dim=4, norm_elt=2)
    assert roofline.write_kv_bytes(act=2, cache_elt=1, **kw) == 32 + 216 + 16
    # per valid token: hidden 5*2, position 8, cos/sin 16, cache 16*2 -> 3*66; weight 2*2*4*5*2.
    assert roofline.inject_kv_bytes(h=5, act=2, cache_elt=2, **kw) == 32 + 198 + 160 + 16
    assert roofline.injection_bytes(h=5, k=2, act=2, cache_elt=2, **kw) == (
        roofline.fuse_bytes(n=4, h=5, k=2, act=2, norm_elt=2) + 406)


def test_verify_bytes_by_hand():
    # logits 2*3*10*4 = 240, tokens 2*3*4 = 24, num_drafts 8, accept+bonus 16, out_tokens 24.
    assert roofline.verify_bytes(batch=2, s=3, v=10, logits_elt=4, token_elt=4) == 312
    assert roofline.verify_bytes(batch=2, s=3, v=10, logits_elt=4, token_elt=4, sampled=True) == 352
    assert roofline.verify_bytes(batch=2, s=3, v=10, logits_elt=4, token_elt=4, seq_lens=True) == 328


def test_tree_bytes_by_hand():
    # parents 2*16*4 = 128, mask 2*16*1*4 = 128, depth 128; N 33: 2 words.
    assert roofline.tree_mask_bytes(batch=2, n=16) == 384
    assert roofline.tree_mask_bytes(batch=1, n=33) == 132 + 264 + 132
    # logits 2*3*10*4 = 240, tokens + parents 2*3*8 = 48, accept+bonus 16, nodes + out 48.
    assert roofline.verify_tree_bytes(batch=2, n=3, v=10, logits_elt=4, token_elt=4) == 352
    assert roofline.verify_tree_bytes(batch=2, n=3, v=10, logits_elt=4, token_elt=4, sampled=True,
                                      seq_lens=True) == 352 + 40 + 16
    # draft logits 2*3*10*2 = 120; tokens 2*4*8 = 64, parents + depth 2*4*8 = 64, num_nodes 8.
    assert roofline.build_tree_bytes(batch=2, d=3, v=10, n=4, logits_elt=2) == 120 + 64 + 64 + 8
    # slots 2*5*8 = 80; 3 kept rows of 2 layers, K and V, 2*4 bf16, read and written: 2*3*2*2*8*2.
    assert roofline.copy_kv_bytes(m=5, kept=3, layers=2, hkv=2, d=4, cache_elt=2) == 80 + 384


def test_bandwidth_arithmetic():
    assert roofline.copy_bytes(5) == 10
    assert roofline.gbps(2e9, 0.5) == pytest.approx(4.0)
    assert roofline.fraction(4.0, 8.0) == pytest.approx(0.5)
    assert roofline.speedup(3e-3, 1e-3) == pytest.approx(3.0)
    assert roofline.gbps(1, 0) is None and roofline.fraction(None, 8.0) is None


def test_copy_bandwidth_counts_read_and_write():
    bw = timing.measure_copy_bandwidth(CPU, nbytes=4 * 2**20, reps=4)
    assert bw["nbytes"] == 4 * 2**20
    assert bw["gbps"] == pytest.approx(2 * bw["nbytes"] / bw["seconds"] / 1e9)


def test_copies_cover_the_rotation_size():
    assert timing.copies_for(30, CPU, 100) == 4          # 4 * 30 >= 100
    assert timing.copies_for(300, CPU, 100) == 1
    assert timing.copies_for(1, CPU, 10**6) == 64        # capped
    assert timing.copies_for(30, CPU, 0) == 1


def test_preset_numbers_are_consistent():
    for name in presets.MODEL_PRESETS:
        s = presets.PRESETS[name]
        assert presets.validate(s) is s
        assert s.s == 16 and 1 <= s.layers <= 8
    assert presets.PRESETS["gpt-oss-20b"].d == 64
    assert math.prod((presets.PRESETS["qwen3-8b"].hq, presets.PRESETS["qwen3-8b"].d)) == 4096
