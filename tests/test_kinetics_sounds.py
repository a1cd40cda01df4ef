"""Kinetics-Sounds: split-file parsing and id matching, availability reporting, the Kaldi filterbank against
hand-built formulas, 1-fps frames, the store (docs/datasets/kinetics_sounds.md). Media made in the tests."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("soundfile")

from av_fixtures import grey, make_ks_raw, tone, write_video  # noqa: E402
from mmbalance.datasets import _avstore as S  # noqa: E402
from mmbalance.datasets import kinetics_sounds as K  # noqa: E402

from mmbalance.data.splits import stratified_split  # noqa: E402
from mmbalance.errors import DatasetFormatError  # noqa: E402
from mmbalance.registry import create_dataset  # noqa: E402


@pytest.fixture(scope="module")
def ks(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("ks")
    videos, splits = make_ks_raw(root)
    out = root / "store"
    K.convert(videos, splits, out, split_unverified=True, frame_size=16, log=lambda s: None)
    return videos, splits, out


def test_ids_labels_and_class_list(tmp_path):
    assert K.parse_id("-3Mwkq-7TV4_2") == ("-3Mwkq-7TV4", 2, None)
    assert K.parse_id("-3Mwkq-7TV4_000002_000012") == ("-3Mwkq-7TV4", 2, 12)
    assert K.parse_id("a_b_c_d_e_f_000010_000020") == ("a_b_c_d_e_f", 10, 20)  # '_' inside the YouTube id
    assert len(K.CLASS_NAMES) == 31
    assert [K.CLASS_NAMES[i] for i in (0, 4, 13, 27, 30)] == ["blowing_nose", "dribbling_basketball",
                                                               "playing_harmonica", "tap_dancing", "tickling"]
    p = tmp_path / "my_train.txt"
    p.write_bytes(b"abcdefghijk_000001_000011,10,3\r\nabcdefghijk_5,10,30\r\n")
    rows, digest = K.read_split_file(p)
    assert rows == [("abcdefghijk_000001_000011", 3), ("abcdefghijk_5", 30)]
    assert digest == hashlib.sha256(b"abcdefghijk_000001_000011,10,3\nabcdefghijk_5,10,30\n").hexdigest()
    p.write_bytes(b"abcdefghijk_000001_000011,10,3\nabcdefghijk_5,10,31\n")
    with pytest.raises(DatasetFormatError, match=r"my_train.txt:2: label 31 outside 0–30"):
        K.read_split_file(p)
    p.write_bytes(b"abcdefghijk_1,10,3,x\n")
    with pytest.raises(DatasetFormatError, match=r"my_train.txt:1: expected '<clip id>,10,<label>'"):
        K.read_split_file(p)


def test_matching_short_test_ids_replacements_and_duplicates(tmp_path):
    raw = tmp_path / "raw"
    for rel in ("a/-3Mwkq-7TV4_000002_000012.mp4", "b/abcdefghijk_000001_000011.mp4",
                "replacement/abcdefghijk_000001_000011.mp4"):
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(b"x")
    vids = K.index_videos(raw)
    by_start = {(y, s): p for (y, s, _e), p in vids.items()}
    assert K.match("-3Mwkq-7TV4_2", vids, by_start).name == "-3Mwkq-7TV4_000002_000012.mp4"
    assert K.match("abcdefghijk_000001_000011", vids, by_start).parent.name == "replacement"
    assert K.match("abcdefghijk_000003_000013", vids, by_start) is None
    (raw / "c").mkdir()
    (raw / "c" / "-3Mwkq-7TV4_000002_000012.mkv").write_bytes(b"x")
    with pytest.raises(DatasetFormatError, match="more than one file.*-3Mwkq-7TV4_000002_000012"):
        K.index_videos(raw)


def test_filterbank_against_hand_formulas():
    silent = K.clip_fbank(np.zeros((1, 160_000), np.float32))
    assert silent.shape == (1024, 128)
    np.testing.assert_allclose(silent[:998], (math.log(1.1920929e-07) + 4.503877) / (2 * 5.141276), atol=1e-5)
    np.testing.assert_allclose(silent[998:], 4.503877 / (2 * 5.141276), atol=1e-6)  # zero rows, normalised
    assert abs(silent[0, 0] - (-1.112419)) < 1e-3 and abs(silent[1000, 0] - 0.438012) < 1e-3
    assert K.clip_fbank(np.zeros((1, 176_000), np.float32)).shape == (1024, 128)  # 11 s: cut to 1,024 rows
    # a 1-kHz tone peaks in the filter whose centre (mel scale, 20 Hz – 8 kHz, 128 + 2 points) is nearest 1 kHz
    fb = K.kaldi_fbank(tone(1000, 2.0, 16_000))
    lo, hi = 1127 * math.log(1 + 20 / 700), 1127 * math.log(1 + 8000 / 700)
    centres = [lo + (b + 1) * (hi - lo) / 129 for b in range(128)]
    expect = min(range(128), key=lambda b: abs(centres[b] - 1127 * math.log(1 + 1000 / 700)))
    assert int(np.argmax(fb[50])) == expect == 43
    # one frame by hand: DC removal, pre-emphasis with the first sample against itself, symmetric Hann, |rfft|²
    rng = np.random.RandomState(0)
    x = rng.randn(16_000).astype(np.float32)
    f = x[160 * 7:160 * 7 + 400].astype(np.float64)
    f = f - f.mean()
    f = f - 0.97 * np.concatenate([[f[0]], f[:-1]])
    f = f * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399))
    power = np.abs(np.fft.rfft(np.concatenate([f, np.zeros(112)]))) ** 2
    banks = K.mel_banks()
    assert banks.shape == (128, 257) and banks[:, 256].max() == 0  # the Nyquist bin has weight 0
    np.testing.assert_allclose(K.kaldi_fbank(x)[7], np.log(np.maximum(power @ banks.T, 1.1920929e-07)), rtol=1e-5)
    # channel 0 by default (torchaudio's fbank reads it), the channel mean with mix=mean
    st = np.stack([tone(440, 2.0, 16_000), tone(3000, 2.0, 16_000)])
    centre_of = {f_: min(range(128), key=lambda b: abs(centres[b] - 1127 * math.log(1 + f_ / 700))) for f_ in (440, 3000)}
    first, mean = K.clip_fbank(st, "first")[50], K.clip_fbank(st, "mean")[50]
    assert int(np.argmax(first)) == centre_of[440] and first[centre_of[3000]] < first[centre_of[440]] - 1  # normalised units (÷ 10.28)
    assert mean[centre_of[3000]] > first[centre_of[3000]] + 1


def test_store_availability_validation_carve_and_round_trip(ks):
    videos, splits, out = ks
    av = json.loads((out / "availability.json").read_text())
    assert av["train"]["found"] == 18 and av["test"]["found"] == 6 and av["train"]["missing"] == 0
    assert av["train"]["per_class"]["dribbling_basketball"] == {"expected": 6, "found": 6, "missing": 0}
    d = create_dataset("kinetics_sounds", path=str(out))
    idx = json.loads((out / "index.json").read_text())
    assert d.info["split_sizes"] == {"train": 15, "val": 3, "test": 6} and d.info["split"] == "unverified"
    assert {idx[int(p)]["list"] for p in d.test.positions} == {"test"}
    # frames at 1 fps of a 25-fps clip: source indices 0, 25, 50
    st = S.AVStore(out, "kinetics_sounds", K.CONVERT_CMD)
    rows = np.arange(st.offsets[0], st.offsets[1])
    assert st.src_index[rows].tolist() == [0, 25, 50]
    assert st.codec == "jpeg"  # the Kinetics-Sounds default (raw 224² frames would take ~26 GB)
    np.testing.assert_allclose(st.get_frames(rows).reshape(3, -1).mean(1), [grey(n) for n in (0, 25, 50)], atol=3)
    key = st.index[0]["key"]  # a training clip: its id is the file name
    x, _ = S.decode_audio_stream(videos / f"{key}.mp4", 16_000)
    np.testing.assert_array_equal(np.asarray(st.audio[0]), K.clip_fbank(x).astype(np.float16))  # bitwise
    # evaluation picks of T = 3 among 3 frames: the frames themselves
    first = int(st.offsets[d.val.positions[0]])
    assert d.val.frame_rows(0, None).tolist() == [first, first + 1, first + 2]


def test_missing_videos_are_reported_and_an_emptied_class_is_an_error(ks, tmp_path, capsys):
    videos, splits, _ = ks
    v2 = tmp_path / "videos"
    shutil.copytree(videos, v2)
    rows = K.read_split_file(splits / "my_train.txt")[0]
    val_i, _ = stratified_split(np.asarray([y for _, y in rows]), [0.1, 0.9], 0)
    full_val = {rows[i][0] for i in val_i}
    gone = [c for c, _ in rows if c not in full_val][::7][:2]  # two training-part clips
    for g in gone:
        (v2 / f"{g}.mp4").unlink()
    out = tmp_path / "store"
    K.convert(v2, splits, out, split_unverified=True, frame_size=16, log=lambda s: None)
    av = json.loads((out / "availability.json").read_text())
    assert av["train"]["found"] == 16 and av["train"]["missing"] == 2
    assert sorted((out / "missing_train.txt").read_text().split()) == sorted(gone)
    assert (out / "missing_test.txt").read_text() == ""
    # the validation carve is made on the FULL list: deleting training clips leaves it unchanged
    d = create_dataset("kinetics_sounds", path=str(out))
    idx = json.loads((out / "index.json").read_text())
    assert {idx[int(p)]["key"] for p in d.val.positions} == full_val
    # no test clip of a class left: exit 2 naming the class
    test = [line.split(",") for line in (splits / "my_test.txt").read_text().split("\n") if line.strip()]
    for clip, _, y in test:
        if int(y) == 13:
            ytid, start, _ = K.parse_id(clip)
            (v2 / f"{ytid}_{start:06d}_{start + 10:06d}.mp4").unlink()
    assert K.main(["--raw", str(v2), "--split-dir", str(splits), "--out", str(tmp_path / "o2"),
                   "--split-unverified", "--frame-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "playing_harmonica in test" in err and not (tmp_path / "o2").exists()
    # OGM-GE's hashes are required unless --split-unverified
    assert K.main(["--raw", str(v2), "--split-dir", str(splits), "--out", str(tmp_path / "o3")]) == 2
    assert K.SPLIT_SHA256["my_train.txt"] in capsys.readouterr().err


def test_corrupt_video_is_named_and_skip_bad_lists_it(ks, tmp_path, capsys):
    videos, splits, _ = ks
    v2 = tmp_path / "videos"
    shutil.copytree(videos, v2)
    victim = sorted(v2.glob("*.mp4"))[3]
    victim.write_bytes(b"\x00" * 500)
    write_video(sorted(v2.glob("*.mp4"))[4], 30, fps=25, size=(48, 36))  # no audio stream
    assert K.main(["--raw", str(v2), "--split-dir", str(splits), "--out", str(tmp_path / "o"), "--split-unverified",
                   "--frame-size", "16"]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "no audio stream" in err
    assert K.main(["--raw", str(v2), "--split-dir", str(splits), "--out", str(tmp_path / "o"), "--split-unverified",
                   "--frame-size", "16", "--skip-bad"]) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert len(meta["bad"]) == 2 and sum(d["lost"] for d in meta["class_losses"].values()) == 2
