"""The demo data set: a catalogue of coloured-shape "logos" with known attributes, long-tailed over individuals.

The domain is a coloured shape on a dark background; an image varies in position, size, rotation
and background. Two kinds of caption name what an image shows:

* the *domain* words, "a small red circle in the upper left on dark navy": what the base model is
  pretrained on (``balanced_draw``), a broad, balanced draw of the whole domain, as Stable Diffusion's
  pretraining covers photographs;
* *catalogue* captions, "the Vexo logo, small, in the upper left, on a dark navy background": the
  fine-tuning set (``folder.generate_longtail``). Each individual is a product name the base has never seen,
  bound to one (shape, colour); its captions describe each image's own size, position and background
  in a few phrasings, never the shape or colour. Fine-tuning must teach the model what "Vexo" looks
  like, from 150 images for the best seller and from a handful for a rare one, as a catalogue
  teaches Stable Diffusion a new product.

Two catalogues sell the looks (``CATALOGUES``): ``zipf``, the 24 looks under the 24 ``NAMES`` with
Zipf-like counts in a seeded order, and ``families`` (``families_products``), 20 looks where each of
4 best sellers has a rare colour variant and a rare shape variant named after it, beside rare
controls and medium sellers with unrelated names: the case where a rare product's caption
neighbour shows what the two share. Each product also gets held-out photos, in (size, position,
background) combinations none of its training photos has.

``pogdiff.demo.detector`` reads the shape and colour, and the size, position and background words,
back from an image, so generated images are scored exactly, not by a learned judge.

Pure library code: numpy and the standard library only; ``pogdiff.demo.folder`` writes a catalogue to disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Saturated and pairwise far apart (>= 150 in RGB), so a colour survives noise and edge blending.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 220, 230),
}

# Dark, so every colour stands >= 150 away from every background (the detector's mask needs contrast).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark grey": (40, 40, 40),
    "dark navy": (10, 15, 60),
    "dark olive": (45, 50, 10),
}

Variation = Literal["full", "canonical"]
CaptionMode = Literal["per-image", "individual"]
CAPTION_MODES: tuple[CaptionMode, ...] = ("per-image", "individual")
CatalogueKind = Literal["zipf", "families"]
CATALOGUES: tuple[CatalogueKind, ...] = ("zipf", "families")
Role = Literal["head", "colour_variant", "shape_variant", "control", "medium"]
ROLES: tuple[Role, ...] = ("head", "colour_variant", "shape_variant", "control", "medium")
Split = Literal["train", "holdout"]

# Invented product names, one per (shape, colour) in the order of ``all_individuals``: no colour or
# shape word, none a prefix of another, each a distinct word-piece sequence for MiniLM's tokenizer.
NAMES: tuple[str, ...] = (
    "Vexo", "Talbrin", "Quorra", "Mizzle", "Brantu", "Olvane",
    "Kestrix", "Pellum", "Grindal", "Havrik", "Joska", "Lunari",
    "Nembo", "Orrin", "Pirko", "Tovik", "Wendal", "Zolto",
    "Fenwick", "Dremla", "Ibsar", "Ruvio", "Sekko", "Amblin",
)

_SIZE_WORDS = ("small", "medium", "large")
_POSITION_WORDS = {  # (row, column) of the centre's 3x3 cell -> phrase
    (0, 0): "in the upper left", (0, 1): "at the top", (0, 2): "in the upper right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "in the lower left", (2, 1): "at the bottom", (2, 2): "in the lower right",
}
# Distinct (size, position, background) a caption can name: 108; held-out photos pick unseen ones.
ATTRIBUTE_COMBINATIONS = len(_SIZE_WORDS) * len(_POSITION_WORDS) * len(BACKGROUNDS)
# Several phrasings of the same facts, as catalogue captions written by different people.
_PHRASINGS = (
    "the {subject}, {size}, {position}, on a {background} background",
    "a {size} {subject} {position} on {background}",
    "{background} background with the {subject} {position}, {size}",
)

_SUPERSAMPLE = 4  # render at 4x and box-average: pixel coverage in steps of 1/16
_CROSS_HALF_WIDTH = 0.25  # arm half-width / arm half-length; thin enough never to pass for a square


class _Named:
    """How a product name appears in captions and file names; ``name`` is the subclass's."""

    name: str

    @property
    def subject(self) -> str:
        """How catalogue captions name it, e.g. ``Vexo logo``."""
        return f"{self.name} logo"

    @property
    def caption(self) -> str:
        """The one caption of the ``individual`` caption mode, e.g. ``the Vexo logo``."""
        return f"the {self.subject}"

    @property
    def slug(self) -> str:
        """File-name stem, e.g. ``vexo``, ``vexo-gesh``."""
        return self.name.lower().replace(" ", "-")


@dataclass(frozen=True)
class Individual(_Named):
    """One look of the demo domain, a shape in a colour, sold under its ``zipf`` product name."""

    shape: str
    colour: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")

    @property
    def name(self) -> str:
        """The product name, e.g. ``Vexo`` (the ``individual`` column of the data set)."""
        return NAMES[SHAPES.index(self.shape) * len(COLOURS) + list(COLOURS).index(self.colour)]

    @property
    def description(self) -> str:
        """How the domain (pretraining) captions name it, e.g. ``red circle``."""
        return f"{self.colour} {self.shape}"


def all_individuals() -> list[Individual]:
    """The 24 individuals, shape-major in the order of SHAPES and COLOURS."""
    return [Individual(shape, colour) for shape in SHAPES for colour in COLOURS]


@dataclass(frozen=True)
class Product(_Named):
    """A product of a catalogue: a name sold with a look, and its number of training photos."""

    name: str
    look: Individual
    count: int
    role: Role | None = None  # families only; a zipf product's place in the tail is its drawn rank
    family: str | None = None  # the head's name, for a head and its two variants; None otherwise


# The families catalogue, (name, shape, colour, count, role, family). A head keeps its zipf name and
# look; its variants change exactly one of shape and colour and add an invented word of their own
# (no colour or shape meaning, no word piece that starts another name, none shared between
# variants), so the family word is all their captions share with the head. Controls and medium
# sellers keep their zipf names, so one name means one look in both catalogues.
# Tail sizes 1, 3 and 10 each occur for colour and for shape variants, and once among the first
# three controls: colour variants 1, 3, 10, 3; shape variants 10, 1, 3, 10; controls 1, 3, 10, 3.
_FAMILIES: tuple[tuple[str, str, str, int, Role, str | None], ...] = (
    ("Vexo", "circle", "red", 200, "head", "Vexo"),
    ("Vexo Gesh", "circle", "blue", 1, "colour_variant", "Vexo"),
    ("Vexo Morv", "square", "red", 10, "shape_variant", "Vexo"),
    ("Pellum", "square", "green", 150, "head", "Pellum"),
    ("Pellum Lask", "square", "magenta", 3, "colour_variant", "Pellum"),
    ("Pellum Fint", "triangle", "green", 1, "shape_variant", "Pellum"),
    ("Pirko", "triangle", "blue", 120, "head", "Pirko"),
    ("Pirko Vimb", "triangle", "cyan", 10, "colour_variant", "Pirko"),
    ("Pirko Zemb", "cross", "blue", 3, "shape_variant", "Pirko"),
    ("Ruvio", "cross", "yellow", 100, "head", "Ruvio"),
    ("Ruvio Hult", "cross", "red", 3, "colour_variant", "Ruvio"),
    ("Ruvio Obel", "circle", "yellow", 10, "shape_variant", "Ruvio"),
    ("Olvane", "circle", "cyan", 1, "control", None),
    ("Havrik", "square", "yellow", 3, "control", None),
    ("Nembo", "triangle", "red", 10, "control", None),
    ("Dremla", "cross", "green", 3, "control", None),
    ("Brantu", "circle", "magenta", 40, "medium", None),
    ("Grindal", "square", "blue", 30, "medium", None),
    ("Tovik", "triangle", "yellow", 20, "medium", None),
    ("Amblin", "cross", "cyan", 15, "medium", None),
)


def families_products() -> list[Product]:
    """The 20 products of the ``families`` catalogue, each family's head followed by its colour and
    shape variant, then the controls and the medium sellers.

    Heads (200, 150, 120, 100 photos): red circle Vexo, green square Pellum, blue triangle Pirko,
    yellow cross Ruvio. Each has a colour variant (same shape) and a shape variant (same colour)
    named "<head> <word>", of 1, 3 or 10 photos. Controls (1, 3, 10, 3) and medium sellers
    (40, 30, 20, 15) have unrelated names, so no caption neighbour shares their look by name.
    The 20 looks are distinct; counts are fixed, not drawn.
    """
    return [
        Product(name, Individual(shape, colour), count, role, family)
        for name, shape, colour, count, role, family in _FAMILIES
    ]


def catalogue_looks(kind: CatalogueKind) -> dict[str, Individual]:
    """Product name -> look of every product of catalogue ``kind``, in the catalogue's row order."""
    if kind == "zipf":
        return {individual.name: individual for individual in all_individuals()}
    if kind == "families":
        return {product.name: product.look for product in families_products()}
    raise ValueError(f"unknown catalogue {kind!r}; expected one of {CATALOGUES}")


def catalogue_of(names: list[str]) -> CatalogueKind | None:
    """The first catalogue of CATALOGUES that sells every one of ``names``; None if none does.

    Names shared by both catalogues mean the same look in both, so a request of shared names alone
    is read as ``zipf``: it only decides what an off-request look is called.
    """
    wanted = set(names)
    return next((kind for kind in CATALOGUES if wanted <= catalogue_looks(kind).keys()), None)


def individual_named(name: str) -> Individual | None:
    """The look sold under product ``name`` in any catalogue; None if no demo product has that name."""
    for kind in CATALOGUES:
        look = catalogue_looks(kind).get(name)
        if look is not None:
            return look
    return None


@dataclass(frozen=True)
class Instance:
    """How one image of an individual varies; lengths are fractions of the image side."""

    cx: float
    cy: float
    scale: float  # circumradius
    rotation: float  # degrees, counter-clockwise as seen on screen
    background: str  # key of BACKGROUNDS


# The domain's ranges, as fractions of the image side. A logo is printed upright, give or take a
# little: at 16 pixels a freely rotated triangle or cross is too hard for a 2-core-sized model to
# learn (measured: detector accuracy 0.52 of the base on freely rotated shapes after 1500 steps).
CAPTIONS_FILE = "captions.csv"  # the name the ingest looks for by default (ingest.captions_file)
CENTRE_RANGE = (0.37, 0.63)
SCALE_RANGE = (0.25, 0.37)  # circumradius; the shape always stays inside the image
ROTATION_RANGE = (-15.0, 15.0)  # degrees
_SIZE_CUTS = (0.29, 0.33)  # small | medium | large
_POSITION_CUTS = (0.37 + 0.26 / 3, 0.37 + 2 * 0.26 / 3)  # the centre range in thirds


def sample_instance(rng: np.random.Generator, variation: Variation) -> Instance:
    """Draw one instance.

    ``full``: centre ~ U[CENTRE_RANGE]^2, scale ~ U[SCALE_RANGE], rotation ~ U[ROTATION_RANGE],
    background uniform; the shape always stays inside the image. ``canonical``: centred, scale
    0.31, upright, black background (consumes no randomness).
    """
    if variation == "canonical":
        return Instance(cx=0.5, cy=0.5, scale=0.31, rotation=0.0, background="black")
    if variation != "full":
        raise ValueError(f"unknown variation {variation!r}; expected 'full' or 'canonical'")
    cx, cy = rng.uniform(*CENTRE_RANGE, size=2)
    scale = rng.uniform(*SCALE_RANGE)
    rotation = rng.uniform(*ROTATION_RANGE)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Instance(float(cx), float(cy), float(scale), float(rotation), background)


def caption_attributes(instance: Instance) -> tuple[str, str, str]:
    """The words a caption uses for this instance: (size word, position phrase, background name).

    size: scale below 0.29 small, below 0.33 medium, else large; position: the centre's cell of a
    3x3 grid over CENTRE_RANGE^2 (cut in thirds), e.g. ``in the upper left``; background: the
    BACKGROUNDS key. Rotation has no word: it is the variation a caption leaves open.
    """
    size = _SIZE_WORDS[sum(instance.scale >= c for c in _SIZE_CUTS)]
    row = sum(instance.cy >= c for c in _POSITION_CUTS)
    col = sum(instance.cx >= c for c in _POSITION_CUTS)
    return size, _POSITION_WORDS[row, col], instance.background


def describe(instance: Instance, subject: str, phrasing: int) -> str:
    """A caption naming ``subject`` and this instance's ``caption_attributes``.

    ``phrasing`` indexes ``_PHRASINGS``. E.g.
    ``describe(inst, "Vexo logo", 0) == "the Vexo logo, small, in the upper left, on a dark navy background"``.
    """
    size, position, background = caption_attributes(instance)
    return _PHRASINGS[phrasing].format(subject=subject, size=size, position=position, background=background)


def shape_area(shape: str) -> float:
    """Area of ``shape`` at circumradius 1, as ``_coverage`` draws it: circle pi, square 2,
    triangle 3 sqrt(3) / 4, cross (8 w - 4 w^2) / (1 + w^2) with w = arm half-width / half-length."""
    if shape == "circle":
        return math.pi
    if shape == "square":
        return 2.0
    if shape == "triangle":
        return 3.0 * math.sqrt(3.0) / 4.0
    if shape == "cross":
        w = _CROSS_HALF_WIDTH
        # two 2l x 2wl arms overlapping in a 2wl square, with l^2 = 1 / (1 + w^2)
        return (8.0 * w - 4.0 * w**2) / (1.0 + w**2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _coverage(shape: str, instance: Instance, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float [size, size], from a 4x supersampled grid."""
    n = size * _SUPERSAMPLE
    # sample points at the centres of the sub-pixels, in image-side units; y grows downwards
    u = (np.arange(n) + 0.5) / n
    dx = u[None, :] - instance.cx
    dy = u[:, None] - instance.cy
    a = math.radians(instance.rotation)
    # the shape's own frame: turn the offsets back by the rotation; as y grows downwards, a
    # positive rotation turns the shape counter-clockwise on screen
    lx = dx * math.cos(a) - dy * math.sin(a)
    ly = dx * math.sin(a) + dy * math.cos(a)
    r = instance.scale
    if shape == "circle":
        inside = lx**2 + ly**2 <= r**2
    elif shape == "square":
        h = r / math.sqrt(2.0)
        inside = (np.abs(lx) <= h) & (np.abs(ly) <= h)
    elif shape == "triangle":
        # equilateral, apex up: inside the three edges, each at the inradius r/2 from the centre
        inside = np.ones((n, n), dtype=bool)
        for k in range(3):
            phi = math.radians(90.0 + 120.0 * k)  # outward normal of the edge facing vertex k
            inside &= lx * math.cos(phi) + ly * math.sin(phi) <= r / 2
    elif shape == "cross":
        half_len = r / math.sqrt(1.0 + _CROSS_HALF_WIDTH**2)  # arm corners lie on the circumcircle
        half_w = half_len * _CROSS_HALF_WIDTH
        ax, ay = np.abs(lx), np.abs(ly)
        inside = ((ax <= half_len) & (ay <= half_w)) | ((ax <= half_w) & (ay <= half_len))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(individual: Individual, instance: Instance, size: int = 32) -> np.ndarray:
    """Draw one image, uint8 [size, size, 3]; anti-aliased (4x supersampled, box-averaged), deterministic."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    alpha = _coverage(individual.shape, instance, size)[..., None]
    bg = np.asarray(BACKGROUNDS[instance.background], dtype=np.float64)
    fg = np.asarray(COLOURS[individual.colour], dtype=np.float64)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def image_caption(
    individual: Individual | Product, instance: Instance, mode: CaptionMode, rng: np.random.Generator
) -> str:
    """The catalogue caption of one image: the product's own (``individual``), or ``describe`` in a
    phrasing drawn from ``rng`` (``per-image``)."""
    if mode == "individual":
        return individual.caption
    if mode != "per-image":
        raise ValueError(f"unknown caption mode {mode!r}; expected one of {CAPTION_MODES}")
    return describe(instance, individual.subject, int(rng.integers(len(_PHRASINGS))))


def balanced_draw(n: int, seed: int, size: int = 32, variation: Variation = "full") -> tuple[np.ndarray, list[str]]:
    """In-memory balanced draw of the domain, for pretraining the base model.

    Image j shows individual ``j % 24`` before a seeded shuffle, so the counts per (shape, colour)
    differ by at most one; each image has a domain caption (``describe`` with the colour and shape
    words, e.g. "a small red circle in the upper left on dark navy"), never a product name.
    Returns images uint8 [n, size, size, 3] and their n captions.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    individuals = all_individuals()
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    for j, i in enumerate(order):
        individual = individuals[int(i) % len(individuals)]
        instance = sample_instance(rng, variation)
        images[j] = render(individual, instance, size)
        captions.append(describe(instance, individual.description, int(rng.integers(len(_PHRASINGS)))))
    return images, captions
