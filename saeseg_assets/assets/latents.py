"""`latent_stats` (one SAE pass over the training activations: counts, sums, top patches) and `class_latents[c]`
(each class's latents by a documented rule, with a patch gallery; one class_latents.json per class)."""

import json

import dagster as dg

from ..automation import DOWNSTREAM_CONDITION
from ..config import launchpad_config
from ..core.settings import SelectionSettings, StatsSettings
from ..partitions import CLASS_BACKFILL_POLICY, class_partitions
from ..recipe import Recipe, stage
from ..resources import Compute, Storage

CLASS_LATENTS_FILE = "class_latents.json"
GALLERY_FILE = "gallery.png"

LatentStatsConfig = launchpad_config("LatentStatsConfig", StatsSettings)
ClassLatentsConfig = launchpad_config("ClassLatentsConfig", SelectionSettings)


@dg.asset(deps=stage("latent_stats", reads=("sae_weights", "train_activations"), writes=("study.latent_stats",)),
          group_name="latents", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(),
          pool="gpu", automation_condition=DOWNSTREAM_CONDITION)
def latent_stats(context: dg.AssetExecutionContext, config: LatentStatsConfig, storage: Storage,
                 compute: Compute) -> dg.MaterializeResult:
    """Per latent: firing frequency, max and mean activation, top training patches; per (class, latent): activation
    sum and firing count over patches of that majority label (all, and pure ones); per class: patch counts."""
    import numpy as np

    from ..core.sae.model import load_sae
    from ..core.study.latent_stats import compute_latent_stats, dense_mask, load_latent_stats, save_latent_stats

    recipe = Recipe(context, storage)
    _, sae_folder = recipe.folder("sae_weights")
    _, cache = recipe.cache("train_activations")
    settings = config.settings()
    out = recipe.output(settings.identity())
    if not out.reused:
        sae, _ = load_sae(sae_folder)
        stats = compute_latent_stats(sae, cache, settings, compute.device, log=context.log.info)
        with out.write() as work:
            save_latent_stats(work, stats)
    stats = load_latent_stats(out.folder)
    freq = stats.frequency_S
    live = freq[freq > 0]
    return out.result({
        "n_tokens": stats.n_tokens,
        "d_sae": stats.d_sae,
        "dead_fraction": float((stats.fire_count_S == 0).mean()),
        "dense_fraction": float(dense_mask(freq).mean()),
        "median_frequency_of_live": float(np.median(live)) if len(live) else float("nan"),
        "classes_in_training": int((stats.class_patches_C[1:] > 0).sum()),
        "pure_patch_fraction": float(stats.pure_patches_C.sum() / max(stats.n_tokens, 1)),
    })


@dg.asset(deps=stage("class_latents", reads=("latent_stats", "probe_checkpoint"),
                     writes=("study.rules", "report.gallery")),
          partitions_def=class_partitions, backfill_policy=CLASS_BACKFILL_POLICY, group_name="latents",
          kinds={"json"}, automation_condition=DOWNSTREAM_CONDITION)
def class_latents(context: dg.AssetExecutionContext, config: ClassLatentsConfig, storage: Storage) -> None:
    """The top-k latents of each class by the configured rule, and every rule's ranking for the latent-count sweep:
    a class_latents.json per class (latent ids, scores, frequencies, max activations); an absent class gets an empty
    list and the reason."""
    from ..core.data.ade20k import class_by_key
    from ..core.probe.model import load_probe
    from ..core.report.gallery import class_gallery_png
    from ..core.report.pictures import png_markdown
    from ..core.sae.model import load_sae
    from ..core.settings import RULES
    from ..core.store.artifacts import write_atomic
    from ..core.study.latent_stats import load_latent_stats, top_patches
    from ..core.study.rules import class_latents_record, margin_effects, select_class_latents

    recipe = Recipe(context, storage)
    stats_key, stats_folder = recipe.folder("latent_stats")
    _, probe_folder = recipe.folder("probe_checkpoint")
    selection = config.settings()
    outputs = {key: recipe.output(selection.identity(), part=key) for key in context.partition_keys}
    store = storage.store
    if todo := [key for key, out in outputs.items() if not out.reused]:
        stats = load_latent_stats(stats_folder)
        made_from = store.inputs("latent_stats", stats_key)
        images = _TrainingImages(context, storage, made_from["train_activations"])
        W_dec_SD = load_sae(store.open("sae_weights", made_from["sae_weights"]))[0].W_dec_SD.detach().numpy()
        probe_W_CD = load_probe(probe_folder).weight_CD.numpy()
    for key in todo:
        ade_class = class_by_key(key)
        effect_S = margin_effects(W_dec_SD, probe_W_CD, stats.class_patches_C > 0, ade_class.index)
        chosen = select_class_latents(stats, ade_class.index, selection, margin_effect_S=effect_S)
        rankings = {rule: select_class_latents(stats, ade_class.index, selection, rule, selection.ranked, effect_S)
                    for rule in RULES}
        record = class_latents_record(chosen, key, ade_class.name, selection, stats.meta, rankings)
        with outputs[key].write() as work:
            write_atomic(work / CLASS_LATENTS_FILE, json.dumps(record, indent=2).encode())
            if chosen.latents:
                tops = [(i, top_patches(stats, i)[: selection.gallery_patches]) for i in chosen.latents]
                write_atomic(work / GALLERY_FILE, class_gallery_png(
                    tops, images.load, images.grid, images.patch_size,
                    f"{key}: top training patches of its latents ({chosen.rule})"))
    for key, out in outputs.items():
        folder = out.folder
        record = json.loads((folder / CLASS_LATENTS_FILE).read_text())
        metadata = {"status": record["status"], "rule": record["rule"], "n_latents": len(record["latents"]),
                    "latents": dg.MetadataValue.md(_latent_table(record))}
        if record["reason"]:
            metadata["reason"] = record["reason"]
            context.log.info(f"{key}: {record['reason']}")
        if (folder / GALLERY_FILE).exists():
            gallery = (folder / GALLERY_FILE).read_bytes()
            metadata["gallery"] = dg.MetadataValue.md(png_markdown(gallery, f"{key} latent gallery"))
        out.record(metadata)


class _TrainingImages:
    """RGB crops of training images by cache index, read once each from the dataset the cache was recorded from."""

    def __init__(self, context, storage: Storage, train_key: str):
        from ..core.data.cache import CACHE_FOLDER, ActivationCache

        cache = ActivationCache(storage.store.open("train_activations", train_key) / CACHE_FOLDER)
        self.grid, self.crop = cache.grid, int(cache.attrs["crop_size"])
        self.patch_size = int(cache.attrs["patch_size"])
        self.root, self.ids = cache.attrs.get("dataset_root", ""), cache.image_ids()
        self.log = context.log
        self._samples, self._crops = None, {}

    def load(self, image_index: int):
        from ..core.data.ade20k import DatasetError, list_split, load_sample

        if image_index not in self._crops:
            try:
                if self._samples is None:
                    self._samples = {s.image_id: s for s in list_split(self.root, "training")}
                self._crops[image_index] = load_sample(self._samples[self.ids[image_index]], self.crop)[0]
            except (DatasetError, KeyError, IndexError, OSError) as exc:
                # A gallery is a view: a moved dataset shows blank tiles rather than failing the selection.
                self.log.warning(f"gallery: training image {image_index} of {self.root} unreadable ({exc}); "
                                 "its tiles stay blank")
                self._samples = self._samples or {}
                self._crops[image_index] = None
        return self._crops[image_index]


def _latent_table(record: dict) -> str:
    from ..core.report.tables import markdown_table

    if not record["latents"]:
        return f"(no latents: {record['reason']})"
    columns = ("latent", "frequency", "max_activation", "mean_activation", "precision", "recall", "pure_f1")
    rows = [{"latent": d["latent"], "score": score, **{c: d[c] for c in columns[1:]}}
            for score, d in zip(record["scores"], record["details"])]
    return markdown_table(rows)
