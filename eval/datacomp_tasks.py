"""DataComp's 38 evaluation tasks: what each one is, how it is scored, how the scores aggregate.

Facts from DataComp's published files (github.com/mlfoundations/datacomp, Gadre et al. 2023):
`tasklist.yml` gives each task's key, display name, main metric (acc1 when none is named) and
random score; `aggregate_scores.py` defines the aggregates (ImageNet; the mean over the ImageNet
distribution shifts, over VTAB, over retrieval; the average over all 38); `eval_utils/` holds
the per-kind metrics (WILDS and fairness groupings, retrieval's mean recall@1). FairFace and
UTKFace are in tasklist.yml without a main metric and are not among the 38.

The reference numbers are OpenAI's CLIP ViT-B/32 as OpenCLIP publishes them
(docs/openclip_results.csv, row "ViT-B-32,openai": average 0.5245 over the 38).

Local copies are read in CLIP_benchmark's webdataset layout (eval.wds_tasks). A task's folder
under --wds-root may have any of the names DataComp's and CLIP_benchmark's download scripts
give it: `wds_<key with / as ->_test` (DataComp; the fairness/ prefix dropped), `wds_<dataset>`
(CLIP_benchmark's Hugging Face names) or the bare dataset name.
"""

from __future__ import annotations

from dataclasses import dataclass

# How a task is scored (eval.datacomp):
#   classification  zero-shot top-1/top-5, mean per-class recall
#   wilds           + metrics over the groups in each sample's .npy metadata
#   retrieval       image<->text recall@k, mean of the two recall@1
#   winogavil       association choice scored by Jaccard index (eval.winogavil, from HF Arrow)
KINDS = ("classification", "wilds", "retrieval", "winogavil")


@dataclass(frozen=True)
class Task:
    key: str  # DataComp's tasklist.yml key
    name: str  # DataComp's display name (the name aggregate_scores.py groups by)
    kind: str
    main_metric: str = "acc1"
    random_score: float | None = None  # tasklist.yml's, where it gives one
    groups: tuple[str, ...] = ()  # which aggregates include it
    openai_b32: float | None = None  # OpenAI ViT-B/32's main metric, from OpenCLIP's table
    aliases: tuple[str, ...] = ()  # other folder names CLIP_benchmark uses

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    @property
    def folder_names(self) -> tuple[str, ...]:
        key = self.key.removeprefix("fairness/")
        dataset = key.split("/", 1)[-1]
        names = [f"wds_{key.replace('/', '-')}_test", f"wds_{key.replace('/', '-')}",
                 f"wds_{dataset}", dataset, *(f"wds_{a}" for a in self.aliases), *self.aliases]
        return tuple(dict.fromkeys(names))


SHIFTS, VTAB, RETRIEVAL = "imagenet_shifts", "vtab", "retrieval"

# The aggregates of aggregate_scores.py, by our names; "average" is over every task present.
AGGREGATES: dict[str, str] = {
    "imagenet": "ImageNet 1k alone",
    SHIFTS: "ImageNet dist. shifts: Sketch, v2, A, O, R, ObjectNet",
    VTAB: "VTAB: the 13 tasks tagged vtab (natural, specialized, structured)",
    RETRIEVAL: "Retrieval: Flickr, MSCOCO, WinoGAViL",
    "average": "Average over the tasks present (DataComp's score when all 38 are)",
}

_C, _W, _R = "classification", "wilds", "retrieval"

TASKS: tuple[Task, ...] = (
    Task("imagenet1k", "ImageNet 1k", _C, random_score=0.001, openai_b32=0.6332),
    Task("imagenet_sketch", "ImageNet Sketch", _C, random_score=0.001, groups=(SHIFTS,),
         openai_b32=0.4229),
    Task("imagenetv2", "ImageNet v2", _C, random_score=0.001, groups=(SHIFTS,), openai_b32=0.5592),
    Task("imagenet-a", "ImageNet-A", _C, random_score=0.008056, groups=(SHIFTS,), openai_b32=0.3155),
    Task("imagenet-o", "ImageNet-O", _C, random_score=0.006047, groups=(SHIFTS,), openai_b32=0.4775),
    Task("imagenet-r", "ImageNet-R", _C, random_score=0.006163, groups=(SHIFTS,), openai_b32=0.6933),
    Task("objectnet", "ObjectNet", _C, random_score=0.009481, groups=(SHIFTS,), openai_b32=0.4431),
    Task("vtab/caltech101", "Caltech-101", _C, "mean_per_class_recall", 0.009804, (VTAB,), 0.8758),
    Task("cifar10", "CIFAR-10", _C, random_score=0.1, openai_b32=0.8983),
    Task("vtab/cifar100", "CIFAR-100", _C, random_score=0.01, groups=(VTAB,), openai_b32=0.6423),
    Task("vtab/clevr_count_all", "CLEVR Counts", _C, random_score=0.125061, groups=(VTAB,),
         openai_b32=0.2320),
    Task("vtab/clevr_closest_object_distance", "CLEVR Distance", _C, random_score=0.190520,
         groups=(VTAB,), openai_b32=0.2335),
    Task("country211", "Country211", _C, random_score=0.004739, openai_b32=0.1720),
    Task("vtab/dtd", "Describable Textures", _C, random_score=0.021277, groups=(VTAB,),
         openai_b32=0.4436),
    Task("vtab/eurosat", "EuroSAT", _C, random_score=0.101483, groups=(VTAB,), openai_b32=0.5044),
    Task("fgvc_aircraft", "FGVC Aircraft", _C, "mean_per_class_recall", 0.01, openai_b32=0.1953),
    Task("food101", "Food-101", _C, random_score=0.009901, openai_b32=0.8400),
    Task("gtsrb", "GTSRB", _C, random_score=0.037604, openai_b32=0.3258),
    Task("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", _C,
         random_score=0.295289, groups=(VTAB,), openai_b32=0.2743),
    Task("mnist", "MNIST", _C, random_score=0.10035, openai_b32=0.4839),
    Task("vtab/flowers", "Oxford Flowers-102", _C, "mean_per_class_recall", 0.009804, (VTAB,),
         0.6670),
    Task("vtab/pets", "Oxford-IIIT Pet", _C, "mean_per_class_recall", 0.027027, (VTAB,), 0.8700),
    Task("voc2007", "Pascal VOC 2007", _C, random_score=0.154038, openai_b32=0.7640),
    Task("vtab/pcam", "PatchCamelyon", _C, random_score=0.5, groups=(VTAB,), openai_b32=0.6224),
    Task("renderedsst2", "Rendered SST2", _C, random_score=0.500001, openai_b32=0.5865),
    Task("vtab/resisc45", "RESISC45", _C, random_score=0.022342, groups=(VTAB,), openai_b32=0.5362),
    Task("cars", "Stanford Cars", _C, random_score=0.00516, openai_b32=0.5963),
    Task("stl10", "STL-10", _C, random_score=0.1, openai_b32=0.9713),
    Task("sun397", "SUN397", _C, random_score=0.004645, groups=(VTAB,), openai_b32=0.6248),
    Task("vtab/svhn", "SVHN", _C, random_score=0.117897, groups=(VTAB,), openai_b32=0.3159),
    Task("retrieval/flickr30k", "Flickr", _R, "mean_recall@1", groups=(RETRIEVAL,),
         openai_b32=0.6884),
    Task("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", _R, "mean_recall@1",
         groups=(RETRIEVAL,), openai_b32=0.4028, aliases=("mscoco_captions",)),
    Task("misc/winogavil", "WinoGAViL", "winogavil", "jaccard_score_10-12", 0.205, (RETRIEVAL,),
         0.4125),
    Task("wilds/iwildcam", "iWildCam", _W, "F1-macro_all", 0.143056, openai_b32=0.0732),
    Task("wilds/camelyon17", "Camelyon17", _W, random_score=0.5, openai_b32=0.6061),
    Task("wilds/fmow", "FMoW", _W, "acc_worst_region", 0.027193, openai_b32=0.1676),
    Task("fairness/dollar_street", "Dollar Street", _W, "acc_top5_wg", openai_b32=0.5386),
    Task("fairness/geode", "GeoDE", _W, "acc_wg", openai_b32=0.8217),
)
assert len(TASKS) == 38 and len({t.name for t in TASKS}) == 38
OPENAI_B32_AVERAGE = 0.5245  # OpenCLIP's table, the same row

# Each WILDS-style task's .npy metadata: the fields in order (DataComp's eval_utils
# wilds_eval.py / fairness_eval.py), and the field its worst-group metric groups by.
METADATA_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "wilds/iwildcam": (("location", "sequence", "year", "month", "day", "hour", "minute",
                        "second", "y"), "location"),
    "wilds/camelyon17": (("hospital", "slide", "y"), "slide"),
    "wilds/fmow": (("region", "year", "y"), "region"),
    "fairness/dollar_street": (("income_ds", "income_meta", "region"), "income_ds"),
    "fairness/geode": (("region", "country"), "region"),
}
# FMoW's region codes (WILDS): 0 Asia, 1 Europe, 2 Africa, 3 Americas, 4 Oceania, 5 Other;
# the worst-region accuracy leaves "Other" out, as WILDS does.
FMOW_OTHER_REGION = 5

# What --suite selects: the whole suite or one aggregate's tasks.
SELECTIONS: dict[str, tuple[Task, ...]] = {
    "datacomp": TASKS,
    SHIFTS: tuple(t for t in TASKS if t.key == "imagenet1k" or SHIFTS in t.groups),
    VTAB: tuple(t for t in TASKS if VTAB in t.groups),
    RETRIEVAL: tuple(t for t in TASKS if RETRIEVAL in t.groups),
}
