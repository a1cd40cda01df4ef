"""Media fixtures for the audio-visual datasets, written in the tests (never real CREMA-D / Kinetics / AVE
media): tones written as WAV by soundfile at the real sample rates, short videos encoded by PyAV from
NumPy frames whose uniform grey level encodes the source frame index, the exact raw file-name conventions."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def grey(k: int) -> int:
    """Grey level of source frame k (distinct for 200 consecutive frames; survives lossy coding ±3)."""
    return 16 + (37 * k) % 200


def write_video(path: Path, n_frames: int, *, fps: int | Fraction = 30, size: tuple[int, int] = (64, 48),
                codec: str | None = None, audio: np.ndarray | None = None, audio_rate: int = 44_100,
                audio_codec: str | None = None, level=grey) -> Path:
    """A video whose frame k is uniformly ``level(k)``; ``audio`` [C, n] float32 adds an audio stream."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    codec = codec or {".flv": "flv", ".mp4": "mpeg4"}.get(ext, "mpeg4")
    w, h = size
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"qscale": "1"} if codec in ("flv", "mpeg4") else {}
        if codec in ("flv", "mpeg4"):
            vs.codec_context.qmin, vs.codec_context.qmax = 1, 2
        as_ = None
        if audio is not None:
            audio_codec = audio_codec or ("mp3" if ext == ".flv" else "aac")
            as_ = out.add_stream(audio_codec, rate=audio_rate)
            as_.layout = "stereo" if audio.shape[0] == 2 else "mono"
        yy, xx = np.mgrid[0:h, 0:w]
        # a zero-mean texture (whole periods) on top of the level: frames are not flat images, whose
        # batch statistics would degenerate in a tiny ResNet
        texture = 12 * np.sin(2 * np.pi * xx / 16) * np.cos(2 * np.pi * yy / 12)
        for k in range(n_frames):
            img = np.clip(level(k) + texture, 0, 255).round().astype(np.uint8)[..., None].repeat(3, axis=2)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        if as_ is not None:
            step = as_.codec_context.frame_size or 1024
            pts = 0
            for s in range(0, audio.shape[1], step):
                chunk = np.ascontiguousarray(audio[:, s:s + step].astype(np.float32))
                fr = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=as_.layout.name)
                fr.sample_rate, fr.pts = audio_rate, pts
                pts += chunk.shape[1]
                for p in as_.encode(fr):
                    out.mux(p)
            for p in as_.encode():
                out.mux(p)
    return path


def write_wav(path: Path, x: np.ndarray, rate: int, subtype: str = "PCM_16") -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, rate, subtype=subtype)
    return path


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


#: CREMA-D fixture: actors × sentences × emotions (XX), plus IEO_HAP_HI; emotion e gets a tone of
#: 300 + 150·e Hz so that the audio carries the label.
CREMAD_EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def make_cremad_raw(root: Path, actors=(1001, 1002, 1003, 1004, 1007, 1008), sentences=("DFA", "ITS"),
                    emotions=CREMAD_EMOTIONS, seconds=(1.27, 2.5, 3.6), size=(64, 48), short: str | None = None,
                    extra_hi: bool = True) -> Path:
    """``AudioWAV/<actor>_<sentence>_<emotion>_XX.wav`` (16-kHz PCM_16 tones) and ``VideoFlash/<same>.flv``
    (30-fps FLV1 + MP3 whose frame k has grey level ``grey(k)``). ``short``: one clip of 0.8 s."""
    rng = np.random.RandomState(0)
    k = 0
    for a in actors:
        for s in sentences:
            for e in emotions:
                stems = [f"{a}_{s}_{e}_XX"] + ([f"{a}_IEO_HAP_HI"] if extra_hi and e == "HAP" and s == sentences[0] else [])
                for stem in stems:
                    dur = 0.8 if stem == short else seconds[k % len(seconds)]
                    k += 1
                    x = tone(300 + 150 * CREMAD_EMOTIONS.index(e), dur, 16_000, 0.3) + \
                        0.01 * rng.randn(int(round(dur * 16_000))).astype(np.float32)
                    write_wav(root / "AudioWAV" / f"{stem}.wav", x, 16_000)
                    write_video(root / "VideoFlash" / f"{stem}.flv", int(round(dur * 30)), fps=30, size=size)
    return root


#: Kinetics-Sounds fixture: YouTube ids are 11 characters (some with '_' or '-'); class c's clips carry a
#: tone of 440 Hz (class 0) or 1 kHz (others) in the left channel.
KS_YTIDS = ["abc_def_g{:02d}", "-x{:02d}yz-1234", "Q_{:02d}-abcdef"]


def make_ks_raw(root: Path, classes=(0, 4, 13), n_train: int = 6, n_test: int = 2, seconds: float = 3.0,
                size=(48, 36)) -> tuple[Path, Path]:
    """``videos/<ytid>_<start:06d>_<end:06d>.mp4`` (25 fps, stereo MP2 44.1 kHz) for every clip of both
    lists, and ``splits/my_train.txt``/``my_test.txt`` in OGM-GE's format (CRLF, ``<id>,10,<label>``;
    test ids in the short ``<ytid>_<start>`` form)."""
    train, test = [], []
    k = 0
    for c in classes:
        for j in range(n_train + n_test):
            ytid = KS_YTIDS[k % 3].format(k % 100)
            assert len(ytid) == 11
            start = 10 * j + c
            long_id = f"{ytid}_{start:06d}_{start + 10:06d}"
            (train if j < n_train else test).append((long_id if j < n_train else f"{ytid}_{start}", c))
            left = tone(440 if c == 0 else 1000, seconds, 44_100, 0.3)
            write_video(root / "videos" / f"{long_id}.mp4", int(seconds * 25), fps=25, size=size,
                        audio=np.stack([left, 0.5 * left]), audio_rate=44_100, audio_codec="mp2")  # AAC: 5× slower
            k += 1
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for name, rows in (("my_train.txt", train), ("my_test.txt", test)):
        (root / "splits" / name).write_bytes("".join(f"{i},10,{y}\r\n" for i, y in rows).encode())
    return root / "videos", root / "splits"


def make_ave_raw(root: Path, size=(32, 24), seconds: int = 10, fps: int = 10) -> tuple[Path, dict[str, list[tuple]]]:
    """``AVE/<id>.mp4`` (10-s, 10-fps (cheaper than AVE's 30), stereo MP2 44.1 kHz: a 1-kHz tone inside the event, silence outside)
    and ``trainSet.txt``/``valSet.txt``/``testSet.txt`` (no header) plus ``Annotations.txt`` (header, CRLF).
    Classes Church bell (0), Banjo (17), Mandolin (27): train 4 / val 2 / test 2 each. Planted: ``dupDUPdup01``
    in train twice (Banjo, then Mandolin); ``crossXtest1`` in train and test; ``zeroLENgth0`` with a 0–0 event;
    ``missingVID0`` listed in train without a file."""
    rows = {"train": [], "val": [], "test": []}
    events = [(0, 10), (2, 5), (1, 9), (3, 10)]
    k = 0
    for cat in ("Church bell", "Banjo", "Mandolin"):
        for part, n in (("train", 4), ("val", 2), ("test", 2)):
            for j in range(n):
                vid = f"v{k:02d}{cat[:3].replace(' ', '_')}{part[:2]}{j}"[:11].ljust(11, "x")
                rows[part].append((cat, vid, *events[k % 4]))
                k += 1
    rows["train"] += [("Banjo", "dupDUPdup01", 0, 10), ("Mandolin", "dupDUPdup01", 0, 10),
                      ("Church bell", "crossXtest1", 0, 10), ("Mandolin", "zeroLENgth0", 0, 0),
                      ("Banjo", "missingVID0", 0, 10)]
    rows["test"].append(("Banjo", "crossXtest1", 0, 10))
    made = set()
    for part in rows:
        for _cat, vid, s, e in rows[part]:
            if vid in made or vid == "missingVID0":
                continue
            made.add(vid)
            rate = 44_100
            t = np.arange(seconds * rate) / rate
            a, b = (s, e) if e > s else (s, s + 1)
            x = np.where((t >= a) & (t < b), 0.3 * np.sin(2 * np.pi * 1000 * t), 0.0).astype(np.float32)
            write_video(root / "AVE" / f"{vid}.mp4", seconds * fps, fps=fps, size=size, audio=np.stack([x, x]),
                        audio_rate=rate, audio_codec="mp2")
    for part, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        (root / name).write_text("".join(f"{c}&{v}&good&{s}&{e}\n" for c, v, s, e in rows[part]))
    allrows = [r for p in ("test", "train", "val") for r in rows[p]]
    (root / "Annotations.txt").write_bytes(("Category&VideoID&Quality&StartTime&EndTime\r\n" + "".join(
        f"{c}&{v}&good&{s}&{e}\r\n" for c, v, s, e in allrows)).encode())
    return root, rows
