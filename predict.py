"""Score new, unlabelled images with the model folder a run saved (issue 33): a PatchCore memory bank, a classifier, or
both (then also the fused detector, as the study computes it). Writes predictions.csv (one row per input file, every
file accounted for), an overlay per image on the model's fixed colour scale, and index.html, a page that opens from
disk. Images are read in batches (bounded memory); unreadable files become rows with status=error and their reason.

    python patchcore.py --data-root /tmp/s --category weave --backbone efficientnet_lite0 --image-size 64 --out-dir /tmp/pc
    python predict.py --model /tmp/pc --images /tmp/s/weave/test --out /tmp/pred      # then open /tmp/pred/index.html
    python predict.py --model runs/patchcore/part --model runs/classify/part --images 'new/*.png' more/ --out pred \\
        --save-maps --overwrite
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import html
import os
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import backbones
import classify
import data
import patchcore
from metrics import normal_threshold

# Files a folder contributes (a file named on the command line is read whatever its name)
EXTENSIONS = (*data.IMAGE_EXTENSIONS, ".webp", ".gif")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # integer greyscale modes wider than 8 bits
OVERLAY_MAX_SIDE = 512  # overlays keep the image's aspect, its longest side in [MIN, MAX] px (file size, caption)
OVERLAY_MIN_SIDE = 256
OVERLAY_ALPHA = 0.45  # weight of the map's colour over the image
OVERLAY_PNG_LEVEL = 1  # zlib level of the overlays: 3x faster than PIL's default 6 at 512 px, files ~5 % larger
CAPTION = 16  # px of each caption line (the title, then each panel's score and decision)
LOG_ODDS_CLIP = 1e-12  # probabilities of 0 or 1 are clipped before the log-odds, as the study's report does


# ----------------------------------------------------------------------------------------------------------------
# 1. Which files: files, folders (recursive, sorted) and globs, each once, with a path relative to the inputs
# ----------------------------------------------------------------------------------------------------------------
def find_images(inputs: Sequence[str], exclude: Path) -> list[tuple[Path, str]]:
    """(absolute path, path relative to the inputs' common folder) of every file to score, sorted; nothing under
    `exclude` (the output folder). A folder contributes its image files (by extension); a named file is taken as is."""
    found, bases = {}, []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS]
            bases.append(path.resolve())
        elif path.is_file():
            files = [path]
            bases.append(path.resolve().parent)
        elif glob.has_magic(item):
            files = [Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file()]
            magic = next(i for i, part in enumerate(Path(item).parts) if glob.has_magic(part))
            bases.append(Path(*Path(item).parts[:magic] or ["."]).expanduser().resolve())
        else:
            raise data.DataError(f"{item} is neither an image file, a folder nor a glob that matches anything")
        for p in files:
            p = p.resolve()
            if exclude not in p.parents:
                found[p] = None
    if not found:
        raise data.DataError(f"no image found in {', '.join(inputs)} (expected image files {' '.join(EXTENSIONS)}, "
                             f"or folders holding them)")
    common = Path(os.path.commonpath([str(b) for b in bases]))
    return sorted(((p, p.relative_to(common).as_posix()) for p in found), key=lambda x: x[1])


# ----------------------------------------------------------------------------------------------------------------
# 2. Reading a file as the model needs it (3-channel 8-bit RGB, upright), or saying why not
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One input file: its row of predictions.csv as it fills, and its image while its batch is scored."""
    path: Path
    rel: str
    image: Image.Image | None = None
    status: str = "ok"  # ok, converted or error
    reason: str = ""

    @property
    def size(self) -> tuple[int | str, int | str]:
        return self.image.size if self.image is not None else ("", "")


def to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """An opened image as 8-bit RGB, and what was converted (empty for an 8-bit RGB file)."""
    notes = []
    orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation: 1 is upright
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        notes.append(f"EXIF orientation {orientation} applied")
    mode = im.mode
    if mode in SIXTEEN_BIT:  # convert("RGB") would clip every value above 255 to white: scale to 8 bits instead
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(arr / 257), 0, 255).astype(np.uint8)).convert("RGB")
        notes.append(f"16-bit greyscale ({mode}) scaled to 8 bits")
    elif mode != "RGB":
        what = {"L": "greyscale", "1": "1-bit", "P": "palette", "RGBA": "RGBA (alpha dropped)", "LA":
                "greyscale+alpha (alpha dropped)", "PA": "palette+alpha (alpha dropped)",
                "CMYK": "CMYK (no colour profile)"}.get(mode, mode)
        with warnings.catch_warnings():  # PIL warns about palette transparency: the alpha is dropped, as said
            warnings.simplefilter("ignore", UserWarning)
            im = im.convert("RGB")
        notes.append(f"{what} converted to RGB")
    return im, notes


def read_item(item: Item) -> Item:
    """Decode item's file into item.image (status ok or converted), or set status error and a one-sentence reason."""
    try:
        if item.path.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # past the limit: an error, not a warning
            with Image.open(item.path) as im:
                im.load()  # the full decode: a truncated file fails here
                item.image, notes = to_rgb(im)
        if notes:
            item.status, item.reason = "converted", "; ".join(notes)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        item.status, item.reason = "error", f"not decoded: past PIL's decompression-bomb limit ({e})"
    except UnidentifiedImageError:
        item.status, item.reason = "error", "not an image file PIL can read (unknown format, or not an image)"
    except (OSError, SyntaxError, ValueError) as e:
        item.status, item.reason = "error", f"cannot read: {e}"
    item.reason = item.reason.replace("\n", " ")
    return item


def batches(files: Sequence[tuple[Path, str]], batch_size: int,
            methods: Sequence[Method]) -> Iterator[tuple[list[Item], dict[str, torch.Tensor]]]:
    """The files read in batches of batch_size, in order, each with its readable images as every model's input
    tensor (B, 3, S, S): run in the reading thread (run), this decoding and resizing overlaps the scoring of the
    previous batch, as the run's own loader does. Only one batch's images are in memory at a time."""
    for start in range(0, len(files), batch_size):
        items = [read_item(Item(p, rel)) for p, rel in files[start:start + batch_size]]
        good = [it.image for it in items if it.status != "error"]
        yield items, {m.name: m.tensors(good) for m in methods} if good else {}


# ----------------------------------------------------------------------------------------------------------------
# 3. The models: each scores a batch at its own size and normalisation, as its run did
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Method:
    """A loaded model folder: name ("patchcore" or "classifier"), model.json, and what scores a batch."""
    name: str
    folder: str
    info: dict
    model: object
    extra: object  # PatchCore's feature extractor, the classifier's Grad-CAM layer

    def tensors(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> (B, 3, S, S) at the size, crop and normalisation that the model was fitted with."""
        m = self.info["model"]
        norm = m["normalization"]
        return torch.stack([data.image_to_tensor(im, m["image_size"], norm["mean"], norm["std"], m["center_crop"])
                            for im in images])

    def score(self, images: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B,) as in the run's scores.csv and maps (B, S, S) of a batch (B, 3, S, S)."""
        if self.name == "patchcore":
            scores, maps = patchcore.score_batch(self.model, self.extra, images.to(device))
            return np.array(scores, dtype=np.float64), np.stack(maps).astype(np.float32)
        d, cam = classify.grad_cam(self.model, self.extra, images.to(device, memory_format=classify.MEMORY_FORMAT))
        return classify.probability(d.cpu().double().numpy()), cam.cpu().numpy()  # p(defect), as classify.score


def load_methods(folders: Sequence[str], device: torch.device) -> list[Method]:
    """The model folders, PatchCore first; one sentence for a missing, foreign or mismatched one."""
    methods = []
    for folder in folders:
        kind = data.read_model_json(folder)["kind"]
        if kind == "patchcore":
            bank, info = patchcore.load_model(folder, device)
            s = bank.settings
            extractor = patchcore.extractor_for(s.backbone, s.weights, s.layers, device)
            methods.append(Method("patchcore", folder, info, bank, extractor))
        else:
            model, cam_layer, info = classify.load_model(folder, device)
            model.requires_grad_(False)  # Grad-CAM needs dd/dA only, as in classify.predict
            methods.append(Method("classifier", folder, info, model, cam_layer))
        if methods[-1].info["calibration"] is None:
            raise data.DataError(f"{folder} has no calibration (it was fitted without held-out normal images); "
                                 f"refit it without --split, or with a split that holds normals out")
    names = [m.name for m in methods]
    if len(set(names)) < len(names):
        raise data.DataError(f"two {names[0]} model folders given; give at most one PatchCore and one classifier")
    categories = {m.info["category"] for m in methods}
    if len(categories) > 1:
        raise data.DataError(f"the model folders were fitted on different categories ({', '.join(sorted(categories))}); "
                             f"the fused detector combines two models of one product")
    return sorted(methods, key=lambda m: m.name != "patchcore")


# ----------------------------------------------------------------------------------------------------------------
# 4. Normalised scores and decisions; the fused detector as in the study (report.calibrated / report.fuse)
# ----------------------------------------------------------------------------------------------------------------
def normalised(x: np.ndarray, threshold: float, low: float) -> np.ndarray:
    """Scores on [0, 1] with the stored threshold at 0.5 and the lowest held-out normal at 0 (anomalib's min-max
    rule, clipped): (N,) -> (N,). The decision is raw score >= threshold, i.e. normalised >= 0.5."""
    spread = threshold - low if threshold - low > 0 else max(abs(threshold), 1.0)
    return np.clip(0.5 + 0.5 * (np.asarray(x, np.float64) - threshold) / spread, 0.0, 1.0)


def z_score(method: str, scores: np.ndarray, normal_scores: np.ndarray) -> np.ndarray:
    """Scores in standard deviations above the mean of held-out normal scores, classifier probabilities as log-odds:
    (N,), (M,) -> (N,). The study's formula (report.calibrated), restated here: predict imports no study code."""
    if method == "classifier":
        scores, normal_scores = (np.log(p) - np.log1p(-p) for p in
                                 (np.clip(x, LOG_ODDS_CLIP, 1 - LOG_ODDS_CLIP) for x in (scores, normal_scores)))
    spread = max(float(np.std(normal_scores, ddof=1)), 1e-12)
    return (scores - np.mean(normal_scores)) / spread


@dataclass
class Fused:
    """The fused detector of a PatchCore and a classifier model: max of the two z-scores, its threshold and floor
    from the held-out normals both models scored (None without any: then no decision)."""
    pc: dict  # {path: score} of PatchCore's held-out normals
    cl: dict  # the classifier's
    threshold: float | None
    low: float | None

    @classmethod
    def of(cls, pc: Method, cl: Method) -> "Fused | None":
        pc_n, cl_n = pc.info["calibration"]["normal_scores"], cl.info["calibration"]["normal_scores"]
        if min(len(pc_n), len(cl_n)) < 2:  # a spread needs two normals (report.fuse: no fused detector then)
            return None
        fused = cls(pc_n, cl_n, None, None)
        both = sorted(set(pc_n) & set(cl_n))  # held-out normals scored by both models
        if both:
            z = fused.score(np.array([pc_n[p] for p in both]), np.array([cl_n[p] for p in both]))
            fused.threshold, fused.low = normal_threshold(z), float(z.min())
        return fused

    def score(self, pc_scores: np.ndarray, cl_scores: np.ndarray) -> np.ndarray:
        """(N,), (N,) -> (N,) the fused z-score."""
        return np.maximum(z_score("patchcore", pc_scores, np.array(list(self.pc.values()))),
                          z_score("classifier", cl_scores, np.array(list(self.cl.values()))))


# ----------------------------------------------------------------------------------------------------------------
# 5. The outputs: predictions.csv, overlays on the fixed colour scale, maps, index.html
# ----------------------------------------------------------------------------------------------------------------
def columns(methods: Sequence[Method], fused: Fused | None) -> list[str]:
    """predictions.csv's columns, in a fixed order."""
    cols = ["path", "width", "height"]
    for m in methods:
        cols += [f"{m.name}_score", f"{m.name}_normalised", f"{m.name}_decision", f"{m.name}_flagged_area"]
    if fused is not None:
        cols += ["fused_score", "fused_normalised", "fused_decision"]
    return cols + ["status", "reason"]


def flagged_area(amap: np.ndarray, pixel_threshold: float) -> float:
    """Fraction of the map's pixels at or above the pixel threshold: (S, S) -> float."""
    return float((amap >= pixel_threshold).mean())


def display_image(image: Image.Image, m: Method) -> Image.Image:
    """The part of the image the model saw (the centre crop's share with --center-crop), its longest side brought
    into [OVERLAY_MIN_SIDE, OVERLAY_MAX_SIDE] (small images grow so that the caption fits, large ones shrink)."""
    crop, size = m.info["model"]["center_crop"], m.info["model"]["image_size"]
    if crop:
        w, h = image.size
        cw, ch = w * crop / size, h * crop / size
        image = image.crop((round((w - cw) / 2), round((h - ch) / 2), round((w + cw) / 2), round((h + ch) / 2)))
    scale = min(max(1.0, OVERLAY_MIN_SIDE / max(image.size)), OVERLAY_MAX_SIDE / max(image.size))
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def overlay_panel(image: Image.Image, m: Method, amap: np.ndarray) -> np.ndarray:
    """The image under its map (S, S), resized to the image, on the calibration's fixed colour scale (never scaled
    per image), the pixel threshold's outline in white: (h, w, 3) uint8."""
    from matplotlib import colormaps  # the colour table only: no figure, ~100x faster than drawing with pyplot
    from scipy.ndimage import binary_erosion
    calib = m.info["calibration"]
    low, high = calib["colour_scale"]
    up = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(image.size, Image.BILINEAR))  # (h, w)
    jet = colormaps["jet"]  # 256 colours: the colour of x in [0, 1] is entry floor(256 x), at most 255, as jet(x)
    level = np.minimum((np.clip((up - low) / (high - low), 0, 1) * jet.N).astype(np.int64), jet.N - 1)  # (h, w)
    colour = (jet(np.arange(jet.N))[:, :3] * 255).astype(np.float32)[level]  # (h, w, 3)
    panel = (1 - OVERLAY_ALPHA) * np.asarray(image, np.float32) + OVERLAY_ALPHA * colour
    flagged = up >= calib["pixel_threshold"]  # (h, w)
    panel[flagged & ~binary_erosion(flagged, iterations=1, border_value=1)] = 255  # the region's outline
    return panel.round().astype(np.uint8)


def save_overlay(path: Path, image: Image.Image, panels: list[tuple[Method, np.ndarray, str]], title: str) -> None:
    """PNG: the title, then per model its overlay_panel with its score and decision above it, side by side."""
    from PIL import ImageDraw, ImageFont
    shown = [display_image(image, m) for m, _, _ in panels]
    tiles = [overlay_panel(im, m, amap) for im, (m, amap, _) in zip(shown, panels)]
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + 4 * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, height + 2 * CAPTION), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=CAPTION - 4)
    draw.text((2, 1), title, fill="black", font=font)
    x = 0
    for tile, (_, _, label) in zip(tiles, panels):
        draw.text((x + 2, CAPTION + 1), label, fill="black", font=font)
        canvas.paste(Image.fromarray(tile), (x, 2 * CAPTION))
        x += tile.shape[1] + 4
    canvas.save(path, compress_level=OVERLAY_PNG_LEVEL)


def write_index(path: Path, rows: list[dict], key: str) -> None:
    """index.html: every overlay, flagged images first, then by normalised score (column `key`), highest first; the
    unreadable files listed below with their reason. Static: no script, opens from disk."""
    ok = [r for r in rows if r["status"] != "error"]
    ok.sort(key=lambda r: (r[key.replace("normalised", "decision")] != "defect", -float(r[key]), r["path"]))
    cards = []
    for r in ok:
        src = urllib.parse.quote(f"overlays/{r['path']}.png")
        decision = r[key.replace("normalised", "decision")]
        cards.append(f'<figure class="{decision}"><a href="{src}"><img src="{src}" loading="lazy" '
                     f'alt="{html.escape(r["path"])}"></a><figcaption>{html.escape(r["path"])}<br>'
                     f'<b>{decision}</b> score {float(r[key]):.3f}'
                     f'{" (" + html.escape(r["reason"]) + ")" if r["reason"] else ""}</figcaption></figure>')
    errors = "".join(f"<li>{html.escape(r['path'])}: {html.escape(r['reason'])}</li>"
                     for r in rows if r["status"] == "error")
    n_flagged = sum(r[key.replace("normalised", "decision")] == "defect" for r in ok)
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>predictions</title><style>"
        "body{font-family:sans-serif} figure{display:inline-block;margin:6px;width:330px;vertical-align:top}"
        "img{max-width:330px} .defect figcaption b{color:#c00} .good figcaption b{color:#070}</style></head><body>"
        f"<h1>{len(rows)} images: {n_flagged} flagged, {len(ok) - n_flagged} good, "
        f"{len(rows) - len(ok)} unreadable</h1><p>Sorted by {html.escape(key)} (the stored threshold is 0.5), "
        f"flagged first; every map on its model's fixed colour scale, the white line its pixel threshold.</p>"
        + "".join(cards) + (f"<h2>Unreadable files</h2><ul>{errors}</ul>" if errors else "") + "</body></html>\n",
        encoding="utf-8")


def fmt(x: float) -> str:
    return f"{float(x):.10g}"


# ----------------------------------------------------------------------------------------------------------------
def score_batch(items: list[Item], tensors: dict[str, torch.Tensor], methods: Sequence[Method], fused: Fused | None,
                device: torch.device, tmp: Path, save_maps: bool) -> tuple[list[dict], float]:
    """The rows of one batch (its readable images as each model's input, see batches) and the seconds its overlays
    took; its overlays (and maps) written under tmp."""
    good = [it for it in items if it.status != "error"]
    results = {m.name: m.score(tensors[m.name], device) if good else None for m in methods}
    rows, index = [], {id(it): i for i, it in enumerate(good)}  # position of each readable file in the batch
    overlay_seconds = 0.0
    for it in items:
        width, height = it.size
        row = {"path": it.rel, "width": width, "height": height, "status": it.status, "reason": it.reason}
        rows.append(row)
        if it.status == "error":
            continue
        i = index[id(it)]
        panels = []
        for m in methods:
            calib = m.info["calibration"]
            x, amap = results[m.name][0][i], results[m.name][1][i]
            norm = float(normalised(x, calib["image_threshold"], min(calib["normal_scores"].values())))
            decision = "defect" if x >= calib["image_threshold"] else "good"
            row.update({f"{m.name}_score": fmt(x), f"{m.name}_normalised": fmt(norm), f"{m.name}_decision": decision,
                        f"{m.name}_flagged_area": fmt(flagged_area(amap, calib["pixel_threshold"]))})
            panels.append((m, amap, f"{m.name}: {norm:.3f} {decision}"))
            if save_maps:
                target = tmp / "maps" / (f"{m.name}/" if len(methods) > 1 else "") / f"{it.rel}.npy"
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, amap)
        title = f"{it.rel}  {methods[0].name} {row[methods[0].name + '_normalised'][:5]} " \
                f"{row[methods[0].name + '_decision']}"
        if fused is not None:
            z = float(fused.score(results["patchcore"][0][i:i + 1], results["classifier"][0][i:i + 1])[0])
            row["fused_score"] = fmt(z)
            if fused.threshold is not None:
                norm = float(normalised(z, fused.threshold, fused.low))
                row.update(fused_normalised=fmt(norm), fused_decision="defect" if z >= fused.threshold else "good")
                title = f"{it.rel}  fused {norm:.3f} {row['fused_decision']}"
        target = tmp / "overlays" / f"{it.rel}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        save_overlay(target, it.image, panels, title)
        overlay_seconds += time.perf_counter() - t0
        it.image = None  # the batch's images are released with it
    return rows, overlay_seconds


def run(args: argparse.Namespace) -> dict:
    """Load the model folders, score every input file in batches, write the outputs atomically; return a summary."""
    # Check: the output folder, the models, the files; one sentence and nothing written if any is wrong
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not args.overwrite:
        raise data.DataError(f"output folder {args.out} exists; give --overwrite to replace it, or another --out")
    if args.batch_size < 1:
        raise data.DataError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = backbones.pick_device(args.device)
    methods = load_methods(args.model, device)
    fused = Fused.of(*methods) if len(methods) == 2 else None
    if len(methods) == 2 and (fused is None or fused.threshold is None):
        print("note: the two models share too few held-out normal images for the fused detector's threshold; "
              "its columns are left out" if fused is None else "note: no held-out normal image was scored by both "
              "models: the fused score has no threshold, so no fused decision", file=sys.stderr)
    files = find_images(args.images, out)
    for m in methods:
        mm, c = m.info["model"], m.info["calibration"]
        print(f"{m.name}: {mm['backbone']} at {mm['image_size']} px from {m.folder}; threshold "
              f"{c['image_threshold']:.4g} from {len(c['normal_scores'])} held-out normals ({c['images']})")
    key = "fused_normalised" if fused is not None and fused.threshold is not None else f"{methods[0].name}_normalised"

    # Score: batch by batch, the next batch read by a thread while this one is scored; rows kept, images not
    t0, rows, overlay_seconds = time.perf_counter(), [], 0.0
    with data.atomic_dir(out) as tmp, \
            contextlib.closing(patchcore.prefetched(batches(files, args.batch_size, methods))) as reader:
        bar = tqdm(total=len(files), desc="predicting", unit="image", disable=None)
        for items, tensors in reader:
            for it in items:
                if it.status == "error" and args.strict:
                    raise data.DataError(f"{it.path}: {it.reason} (--strict ends the run at the first unreadable "
                                         f"file; nothing was written)")
            batch_rows, seconds = score_batch(items, tensors, methods, fused, device, tmp, args.save_maps)
            rows += batch_rows
            overlay_seconds += seconds
            bar.update(len(items))
        bar.close()
        # Write: predictions.csv in the input order, then the page
        cols = columns(methods, fused)
        with open(tmp / "predictions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=cols, restval="")
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in cols} for r in rows)
        write_index(tmp / "index.html", rows, key)
    seconds = time.perf_counter() - t0
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "converted", "error")}
    flagged = sum(r.get(key.replace("normalised", "decision")) == "defect" for r in rows)
    print(f"{len(rows)} files: {counts['ok']} ok, {counts['converted']} converted, {counts['error']} unreadable; "
          f"{flagged} flagged as defects by {key.removesuffix('_normalised')}")
    print(f"{seconds / len(rows):.3f} s per image ({seconds:.1f} s in all, {overlay_seconds:.1f} s of it drawing and "
          f"writing overlays); results in {out / 'index.html'}")
    return {"rows": rows, "seconds_per_image": seconds / len(rows), "overlay_seconds_per_image":
            overlay_seconds / len(rows), "out": out, **counts}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="a run folder of patchcore.py or classify.py (holding model.json); give it twice, once per "
                        "method, for both and the fused detector")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders (recursive) or quoted globs")
    p.add_argument("--out", required=True, help="output folder (written whole at the end, or not at all)")
    p.add_argument("--save-maps", action="store_true", help="also write each anomaly map as maps/<path>.npy")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--strict", action="store_true", help="end the run at the first unreadable file")
    p.add_argument("--batch-size", type=int, default=8, help="images scored together (scores do not depend on it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
