"""Small JPEG previews of indexed images, rendered on demand and kept in a bounded LRU cache.

Ids are never reused (the index's AUTOINCREMENT), so a thumbnail cached under an id can never
go stale; the cache bound only caps memory. Rendering goes through ``load_image`` like every
other decode, so an indexed file that was replaced by a bomb on disk is still refused, and
under the service's decode budget. It asks for twice the thumbnail's size, so a JPEG decodes
at 1/2, 1/4 or 1/8 scale (a 40 MP photo at 1/8 is 0.6 MP: far less time and memory).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image

from waldo.data.images import DecodeBudget, load_image

__all__ = ["ThumbnailCache", "render_thumbnail"]


#: The decode asks for this many times the thumbnail's side: the final Lanczos step then has
#: enough pixels to average, so the reduced-scale decode costs nothing visible.
DECODE_MARGIN = 2


def render_thumbnail(path: str, size: int, max_pixels: int, *, budget: DecodeBudget | None = None,
                     budget_timeout: float | None = None) -> bytes:
    """JPEG bytes of ``path`` scaled so its longest side is at most ``size`` pixels.

    ``budget`` / ``budget_timeout``: as for :func:`~waldo.data.images.load_image`
    (:class:`~waldo.data.images.DecodeBusyError` when the budget has no room in time,
    :class:`~waldo.data.images.ImageLoadError` for an unreadable or refused image).
    """
    image = load_image(path, max_pixels=max_pixels, max_side=DECODE_MARGIN * size, budget=budget,
                       budget_timeout=budget_timeout)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """Thread-safe LRU of rendered thumbnails keyed by image id."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: int) -> bytes | None:
        with self._lock:
            data = self._items.get(image_id)
            if data is not None:
                self._items.move_to_end(image_id)
            return data

    def put(self, image_id: int, data: bytes) -> None:
        with self._lock:
            self._items[image_id] = data
            self._items.move_to_end(image_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def drop(self, image_id: int) -> None:
        with self._lock:
            self._items.pop(image_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
