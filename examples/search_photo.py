"""Query an index with one photo through the Python API: print the hits, save a picture grid.

    .venv/bin/python examples/search_photo.py PHOTO --index demo-index [-k 8] [--out results.png]

The whole API use is the three lines under "search"; the rest prints and draws. Build an index
first, e.g. ``waldo index build --data ../shared/data/abo_sample --out my-index``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from waldo import SearchHit, Waldo
from waldo.data.images import load_image

TILE = 220  # pixels per square tile
CAPTION = 44  # pixels of text under each tile


def tile(path: str | Path, caption: list[str], border: tuple[int, int, int]) -> Image.Image:
    """One square thumbnail with a coloured border and two caption lines below it."""
    picture = load_image(path)  # the safe loader: EXIF rotation, any mode -> RGB
    picture.thumbnail((TILE - 8, TILE - 8))
    out = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    frame = Image.new("RGB", (TILE, TILE), border)
    frame.paste(picture, ((TILE - picture.width) // 2, (TILE - picture.height) // 2))
    out.paste(frame, (0, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=14)
    for row, text in enumerate(caption):
        draw.text((6, TILE + 4 + row * 19), text[:30], fill=(30, 30, 40), font=font)
    return out


def result_grid(query: str | Path, hits: list[SearchHit], columns: int = 5) -> Image.Image:
    """The query (blue frame) followed by the hits in rank order."""
    tiles = [tile(query, ["query", Path(query).name], (59, 91, 219))]
    for hit in hits:
        label = hit.attrs.get("class_name") or hit.identity or Path(hit.path).stem
        tiles.append(tile(hit.path, [f"#{hit.rank}  score {hit.score:.3f}", str(label)], (225, 228, 236)))
    rows = (len(tiles) + columns - 1) // columns
    gap = 10
    grid = Image.new("RGB", (columns * (TILE + gap) + gap, rows * (TILE + CAPTION + gap) + gap), (244, 245, 248))
    for i, piece in enumerate(tiles):
        grid.paste(piece, (gap + (i % columns) * (TILE + gap), gap + (i // columns) * (TILE + CAPTION + gap)))
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("photo", help="the query photo")
    parser.add_argument("--index", required=True, help="an index folder built by `waldo index build`")
    parser.add_argument("-k", type=int, default=8, help="how many results")
    parser.add_argument("--out", default="results.png", help="where to save the picture grid (PNG)")
    args = parser.parse_args(argv)

    # ---- search: open the index (model included), query, get SearchHit objects
    engine = Waldo.open(args.index)
    hits = engine.search(args.photo, k=args.k).hits

    print(f"top {len(hits)} of {len(engine)} indexed images for {args.photo}")
    print(f"{'rank':>4}  {'score':>6}  {'identity':<10}  {'label':<28}  path")
    for hit in hits:
        label = hit.attrs.get("class_name", "")
        print(f"{hit.rank:>4}  {hit.score:6.3f}  {hit.identity:<10}  {label:<28}  {hit.path}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result_grid(args.photo, hits).save(out, format="PNG")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
