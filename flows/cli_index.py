"""``pogdiff index`` and ``pogdiff neighbours``: build the caption index, and explain one caption's weight.

``neighbours`` answers "who are this caption's neighbours, and why is its psi what it is": the stored
top-k with their cosines, each caption's effective density, and psi from the PoG config. psi needs
the image similarity of one image pair, drawn anew at every training step; the command shows the
mean clipped cosine over all image pairs of the two captions, and psi at that value.
"""

from __future__ import annotations

import json
import time

from tasks.config import load_config


def _index_config(path: str | None):
    return load_config(path).index


def cmd_index(args, settings) -> int:
    from storage import dataset
    from storage.items import SourceError
    from tasks.index import build_caption_index, build_image_features

    cfg = _index_config(args.config)
    if not dataset.exists(settings.dataset_uri) or not dataset.caption_counts(settings.dataset_uri):
        raise SourceError(f"dataset {settings.dataset_uri} has no images; run `pogdiff ingest SOURCE` first")
    caps = build_caption_index(settings, cfg, progress=not args.json)
    imgs = build_image_features(settings, cfg)
    if args.json:
        # the dataset as it is now, no pinned snapshot: the printed reports have never had the field
        print(json.dumps({"captions": caps.model_dump(mode="json", exclude={"snapshot_id"}),
                          "images": imgs.model_dump(mode="json", exclude={"snapshot_id"})}))
        return 0
    ann = "yes" if caps.ann_index else f"no (created above {cfg.ann_threshold} captions)"
    print(f"captions: {caps.captions} — embedded {caps.embedded}, reused {caps.reused} "
          f"(already embedded by {caps.embedder})")
    print(f"graph:    {caps.mode} top-{caps.k}, {caps.edges} edges, {caps.recomputed} rows recomputed, "
          f"{caps.patched} patched ({caps.graph_update}); density bandwidth {cfg.density_bandwidth}")
    print(f"lancedb:  table 'captions' version {caps.version}, {caps.written} rows written, {caps.deleted} deleted; "
          f"ANN index: {ann}")
    print(f"images:   {imgs.computed} features computed, {imgs.reused} reused ({imgs.extractor})")
    print(f"done in {time.perf_counter() - args.started:.1f} s (embedding and graph {caps.seconds:.1f} s)")
    return 0


def _pair_similarities(feats, images_of: dict[str, list[str]], a: str, b: str):
    """clip(cos, 0, 1) of every image pair (one image of caption a, one of b) as a flat tensor; None without images."""
    import numpy as np
    import torch

    fa = [feats[i] for i in images_of.get(a, []) if i in feats]
    fb = [feats[i] for i in images_of.get(b, []) if i in feats]
    if not fa or not fb:
        return None
    return torch.from_numpy(np.clip(np.stack(fa) @ np.stack(fb).T, 0.0, 1.0)).float().flatten()


def _feature_name(cfg, uri: str) -> str:
    """The configured image feature's name, from what the index stored when exactly one stored feature
    is of the configured kind; only otherwise is the extractor built (for ``unet`` that loads the base
    model, just to hash its weights into the name)."""
    from pogdiff.index import image_extractor
    from storage import vectors

    kind = cfg.image_feature if cfg.image_feature != "pixels" else f"pixels{cfg.image_feature_size}"
    stored = [n for n in vectors.stored_extractors(uri) if n == kind or n.startswith(f"{kind}:")]
    return stored[0] if len(stored) == 1 else image_extractor(cfg).name


def _explain(args, settings) -> dict:
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from pogdiff.embedders import make_embedder
    from pogdiff.index import caption_id
    from pogdiff.neighbours import DUPLICATE_COS, KERNEL_CUTOFF, psi_weight, similarity_threshold, thresholded
    from storage import dataset, vectors
    from storage.items import SourceError

    config = load_config(args.config)
    cfg, pog = config.index, config.train.pog
    table = vectors.read_caption_table(settings.lancedb_uri)
    if table is None:
        raise SourceError(f"LanceDB at {settings.lancedb_uri} has no captions table; run `pogdiff index` first")
    ids = table.column("caption_id").to_pylist()
    row = {c: i for i, c in enumerate(ids)}
    captions = table.column("caption").to_pylist()
    counts = table.column("count").to_numpy()
    density = table.column("density").to_numpy()
    # psi normalises by the mean of rho_eff over training images, i.e. weighted by each caption's count
    mean_rho = float((counts * density).sum() / max(counts.sum(), 1))
    cid = caption_id(args.caption)
    k = args.k or cfg.k
    if cid in row:
        if k > cfg.k:
            from pogdiff.config import ConfigError

            raise ConfigError(f"-k {k}: the index keeps {cfg.k} neighbours per caption (index.k); "
                              "build it with a larger index.k to see more")
        i = row[cid]
        nb = [(j, float(s)) for j, s in zip(table.column("neighbour_ids")[i].as_py(), table.column("neighbour_sims")[i].as_py())
              if j][:k]
        own = {"in_dataset": True, "count": int(counts[i]), "density": float(density[i]), "source": "stored graph"}
    else:
        embedder = make_embedder(cfg)
        stored = set(pc.unique(table.column("embedder")).to_pylist())
        if stored != {embedder.key}:
            raise SourceError(f"the captions table was embedded by {sorted(stored)}, not by the configured {embedder.key}; "
                              "pass the --config the index was built with")
        vec = embedder.forward(embedder.tokenize([args.caption]))[0].numpy()
        hits = vectors.search_captions(settings.lancedb_uri, vec, max(cfg.ann_candidates, k + 1), cfg)
        near = [h for h in hits if h["similarity"] < DUPLICATE_COS]
        nb = [(h["caption_id"], h["similarity"]) for h in near[:k]]
        reach = [h for h in hits if 1 - h["similarity"] < KERNEL_CUTOFF * cfg.density_bandwidth]
        rho = sum(h["count"] * float(np.exp(-(1 - h["similarity"]) ** 2 / (2 * cfg.density_bandwidth**2))) for h in reach)
        own = {"in_dataset": False, "count": 0, "density": rho, "source": f"nearest {len(hits)} stored captions"}
    images = dataset.read_images(settings.dataset_uri, columns=["id", "caption"], split="train")  # held-out photos have no psi feature
    images_of: dict[str, list[str]] = {}
    image_ids, image_caps = images.column("id").to_pylist(), images.column("caption").to_pylist()
    for image_id, caption in zip(image_ids, image_caps):
        images_of.setdefault(caption_id(caption), []).append(image_id)
    extractor = _feature_name(cfg, settings.lancedb_uri)
    feats = vectors.read_image_features(settings.lancedb_uri, extractor)
    ratio = own["density"] / mean_rho if mean_rho > 0 else float("nan")
    featured = [n for n, i in enumerate(image_ids) if i in feats]
    cap_index = {c: n for n, c in enumerate(sorted(images_of))}
    tau = similarity_threshold(torch.from_numpy(np.stack([feats[image_ids[n]] for n in featured])) if featured else torch.zeros(0, 1),
                               torch.tensor([cap_index[caption_id(image_caps[n])] for n in featured], dtype=torch.long),
                               pog.similarity_quantile)
    steps = 1000
    t = torch.arange(steps)  # psi is shown as its mean over the timesteps, as training draws them
    rows = []
    for j, sim in nb:
        pairs = _pair_similarities(feats, images_of, cid, j)
        s_img = psi = None
        if pairs is not None:
            s_img = float(pairs.mean())
            s = thresholded(pairs, tau).repeat_interleave(steps)
            psi = float(psi_weight(s, torch.full_like(s, ratio), t.repeat(len(pairs)), steps,
                                   pog.lam, pog.a, pog.b, pog.timestep_weight, pog.psi_max).mean())
        rows.append({"caption_id": j, "caption": captions[row[j]], "similarity": sim, "count": int(counts[row[j]]),
                     "density": float(density[row[j]]), "s_img": s_img, "psi": psi})
    return {"caption": args.caption, "caption_id": cid, **own, "mean_density": mean_rho, "density_ratio": ratio,
            "method": pog.method, "lam": pog.lam, "a": pog.a, "b": pog.b, "timestep_weight": pog.timestep_weight,
            "similarity_quantile": pog.similarity_quantile, "tau": tau, "image_feature": extractor, "neighbours": rows}


def cmd_neighbours(args, settings) -> int:
    from pogdiff.tables import fmt

    out = _explain(args, settings)
    if args.json:
        print(json.dumps(out))
        return 0
    n = out["count"]
    where = f"{n} training image{'' if n == 1 else 's'}" if out["in_dataset"] else "not in the dataset"
    print(f"caption: {out['caption']!r} ({where}; id {out['caption_id']})")
    print(f"density: rho_eff {out['density']:.3f} from the {out['source']}; mean over training images "
          f"{out['mean_density']:.3f}; ratio {out['density_ratio']:.3f}")
    print(f"psi = lam * clip((s_img - tau) / (1 - tau), 0, 1)^a * ratio^-b * w(t), lam={out['lam']} a={out['a']} b={out['b']}, "
          f"tau {out['tau']:.3f} (quantile {out['similarity_quantile']} of s_img over random image pairs), w(t) {out['timestep_weight']}")
    if out["method"] != "pogdiff":
        print(f"note: the config's method is {out['method']}, which does not use this psi")
    print(f"s_img: mean of clip(cos, 0, 1) of {out['image_feature']} features over all image pairs of the two captions; "
          "psi: its mean over those pairs and all timesteps (training draws one pair and one t per sample)")
    if not out["neighbours"]:
        print("no neighbours (the index holds no other caption)")
        return 0
    print(f"\n{'#':>2}  {'cosine':>7}  {'count':>6}  {'rho_eff':>9}  {'s_img':>6}  {'psi':>7}  caption")
    for n, r in enumerate(out["neighbours"], 1):
        print(f"{n:>2}  {r['similarity']:>7.4f}  {r['count']:>6}  {r['density']:>9.3f}  {fmt(r['s_img']):>6}  "
              f"{fmt(r['psi']):>7}  {r['caption']}")
    if not out["in_dataset"]:
        print("(no psi: a caption without training images has no image pair to compare)")
    return 0


def add_commands(sub) -> None:
    from flows.cli_args import at_least, command, existing_file

    i = command(sub, "index", "embed new captions, refresh the neighbour graph and image features of the current dataset",
                "pogdiff index --config configs/demo.yaml")
    i.add_argument("--config", type=existing_file, help="retrain config YAML whose 'index' section applies (default: the built-in defaults)")
    i.add_argument("--json", action="store_true", help="print the report as JSON (no progress bar)")
    i.set_defaults(func=cmd_index)

    n = command(sub, "neighbours", "a caption's neighbours, their similarities and densities, and the psi each would get",
                'pogdiff neighbours "Vexo Azure, a small blue star" -k 5')
    n.add_argument("caption", help="caption text (need not be in the dataset)")
    n.add_argument("--config", type=existing_file, help="retrain config YAML: 'index' and 'train.pog' sections (default: the built-in defaults)")
    n.add_argument("-k", type=at_least(1), help="how many neighbours to show (default and, for a caption in the dataset, at most: the index's k)")
    n.add_argument("--json", action="store_true", help="print as JSON")
    n.set_defaults(func=cmd_neighbours)
