"""Does psi's image similarity see identity? s_img on the demo catalogue, per feature and caption variant.

    python -m bench.similarity            # both caption variants, features unet and pixels

For each variant the demo data (data seed 0) is ingested and indexed in a scratch home with each
feature, as the pipeline does, and the JSON gives the mean s_img (clipped cosine) of:

- ``same_individual``: two images of the same product;
- ``neighbour_other_individual``: an image of a caption and an image of one of its top-k caption
  neighbours that names another product (what borrowing would pull towards);
- ``neighbour_same_individual``: the same for neighbours naming the same product;
- ``unrelated``: two products that share neither shape nor colour;

Means are on each feature's own scale, so features are compared by scale-free figures: ``auc_*``,
the probability that a same-product pair is more alike than a pair of the other kind (neighbour of
another product; another product of the same colour), and ``above_tau_*``, the share of pairs of
each kind above the default threshold tau (``PoGConfig().similarity_quantile`` of random pairs),
i.e. the pairs that may borrow at all. Also the share of caption neighbours naming another product.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from scipy.stats import mannwhitneyu

from bench.longtail import load_prepared
from pogdiff.config import IndexConfig, PoGConfig
from pogdiff.demo import catalogue, folder
from pogdiff.neighbours import similarity_threshold
from tasks.config import RetrainConfig

FEATURES = ("unet", "pixels")


def similarity_report(features: torch.Tensor, caption_of: torch.Tensor, individual_of_caption: list[int],
                      nb_ids: torch.Tensor, looks: list[catalogue.Individual]) -> dict:
    """The figures above for one feature; features ``[N, F]``, caption_of ``[N]``, nb_ids ``[C, k]``."""
    image_individual = torch.tensor(individual_of_caption)[caption_of]
    f = features.float()
    s = (f @ f.T).clamp(0, 1)
    same = image_individual[:, None] == image_individual[None]
    off = ~torch.eye(len(f), dtype=torch.bool)
    colour = torch.tensor([[a.colour == b.colour for b in looks] for a in looks])[image_individual][:, image_individual]
    shape = torch.tensor([[a.shape == b.shape for b in looks] for a in looks])[image_individual][:, image_individual]
    nb_same, nb_other = [], []
    for c in range(nb_ids.shape[0]):
        for j in nb_ids[c].tolist():
            if j >= 0:
                pair = s[caption_of == c][:, caption_of == j].flatten()
                (nb_same if individual_of_caption[c] == individual_of_caption[j] else nb_other).append(pair)
    same_pairs = s[same & off]
    kinds = {"neighbour_other_individual": torch.cat(nb_other) if nb_other else torch.zeros(0),
             "same_colour_other_individual": s[colour & ~same], "unrelated": s[~colour & ~shape]}
    tau = similarity_threshold(f, caption_of, PoGConfig().similarity_quantile)
    out = {
        "same_individual": float(same_pairs.mean()),
        "neighbour_same_individual": float(torch.cat(nb_same).mean()) if nb_same else None,
        **{k: float(v.mean()) if len(v) else None for k, v in kinds.items()},
        "neighbour_other_share": len(nb_other) / max(len(nb_same) + len(nb_other), 1),
        "tau": tau,
        "above_tau_same_individual": float((same_pairs > tau).float().mean()),
    }
    for name in ("neighbour_other_individual", "same_colour_other_individual"):
        other = kinds[name]
        out[f"auc_same_vs_{name}"] = None if not len(other) else float(
            mannwhitneyu(same_pairs.numpy(), other.numpy()).statistic / (len(same_pairs) * len(other)))
        out[f"above_tau_{name}"] = float((other > tau).float().mean()) if len(other) else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.similarity", description=__doc__.split("\n\n")[0])
    p.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES))
    p.add_argument("--captions", nargs="+", choices=catalogue.CAPTION_MODES, default=list(catalogue.CAPTION_MODES))
    args = p.parse_args(argv)
    from storage import parquet
    from storage.settings import Settings
    from tasks.index import build_caption_index, build_image_features

    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="similarity-") as tmp:
        for captions in args.captions:
            source = Path(tmp) / f"demo-{captions}"
            folder.generate_longtail(source, seed=0, captions=captions)
            home = Path(tmp) / f"home-{captions}"
            settings = Settings(home=home)
            parquet.ingest(source, settings.dataset_uri, RetrainConfig().ingest, workers=1)
            for feature in args.features:
                index_cfg: IndexConfig = RetrainConfig.model_validate({"index": {"image_feature": feature}}).index
                build_caption_index(settings, index_cfg)
                build_image_features(settings, index_cfg)
                prep = load_prepared(home, index_cfg, 16, captions, "individual")
                g = prep.data.graph
                owner = {prep.real.captions[r]: int(i) for r, i in enumerate(prep.real.group)}
                looks = [catalogue.individual_named(n) for n in prep.real.names]
                results.setdefault(captions, {})[feature] = similarity_report(
                    g.image_features, g.caption_of, [owner[c] for c in prep.data.captions], g.nb_ids, looks)
    print(json.dumps({"bench": "similarity", "data": "demo catalogue, data seed 0", "k": IndexConfig().k,
                      "results": results,
                      "goal": "same individual above a neighbour of another individual by a clear margin: AUC near 1",
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
