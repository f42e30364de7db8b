"""MedMNIST v3's twelve 2D datasets (Yang et al., MedMNIST v2, Sci. Data 2023; MedMNIST+
sizes 64/128/224): what falkit needs to find, check and read them.

Copied from ``medmnist/info.py`` of the medmnist package 3.0.2 (labels, channels, task,
split sizes, the MD5 of each size's ``.npz``); every file lies at
``https://zenodo.org/records/10519652/files/<name>[_<size>].npz`` — no suffix for 28×28,
which is also how the medmnist package names its downloads in ``~/.medmnist``. v3 changed
the 28×28 files of Organ{A,C,S}MNIST (their MD5s and a few samples) against v2.

Two tasks are not MedMNIST's own here, on purpose and by name:

* ``chestmnist`` is multi-label (14 findings per X-ray). falkit's strategies, budgets and
  metrics are single-label, so falkit's ``chestmnist`` is the binary task *no finding* vs
  *any finding* — its numbers are not comparable with MedMNIST's 14-label ChestMNIST table.
* ``retinamnist`` is ordinal regression in MedMNIST's description; it is trained, as in
  MedMNIST's own baselines, as 5-class classification.

Horizontal flips are off for Organ{A,C,S}MNIST: their labels name sides (femur-left,
kidney-right, lung-left, ...), which a flip would swap.
"""

from __future__ import annotations

from typing import NamedTuple

#: The sizes MedMNIST+ publishes for every 2D set (28 is MedMNIST v2's).
SIZES = (28, 64, 128, 224)
URL = "https://zenodo.org/records/10519652/files/{}.npz?download=1"


class MedSet(NamedTuple):
    title: str
    what: str
    channels: int
    task: str  # medmnist's: multi-class | binary-class | ordinal-regression | multi-label, ...
    train: int  # official split sizes (28×28; the same at every size)
    val: int
    test: int
    md5: tuple[str, str, str, str]  # of <name>.npz, <name>_64.npz, _128, _224
    classes: tuple[str, ...]  # label names, in label order
    hflip: bool = True


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
           "liver", "lung-left", "lung-right", "pancreas", "spleen")
#: ChestMNIST's 14 findings (the columns of its multi-label targets).
CHEST_FINDINGS = ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                  "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema",
                  "fibrosis", "pleural", "hernia")

SETS: dict[str, MedSet] = {
    "pathmnist": MedSet(
        "PathMNIST", "colour colon histology patches", 3, "multi-class", 89996, 10004, 7180,
        ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
         "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
         "normal colon mucosa", "cancer-associated stroma",
         "colorectal adenocarcinoma epithelium")),
    "chestmnist": MedSet(
        "ChestMNIST", "grayscale chest X-rays, binary: no finding vs any of 14 findings", 1,
        "multi-label, binary-class", 78468, 11219, 22433,
        ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
         "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
        ("no finding", "finding")),  # falkit's binary reduction, see the module docstring
    "dermamnist": MedSet(
        "DermaMNIST", "colour dermatoscopy images", 3, "multi-class", 7007, 1003, 2005,
        ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
         "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
        ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
         "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
         "vascular lesions")),
    "octmnist": MedSet(
        "OCTMNIST", "grayscale retinal OCT scans", 1, "multi-class", 97477, 10832, 1000,
        ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
         "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
    "pneumoniamnist": MedSet(
        "PneumoniaMNIST", "grayscale pediatric chest X-rays", 1, "binary-class", 4708, 524, 624,
        ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
         "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
        ("normal", "pneumonia")),
    "retinamnist": MedSet(
        "RetinaMNIST", "colour fundus images, diabetic retinopathy grade", 3,
        "ordinal-regression", 1080, 120, 400,
        ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
         "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
        ("0", "1", "2", "3", "4")),
    "breastmnist": MedSet(
        "BreastMNIST", "grayscale breast ultrasound images", 1, "binary-class", 546, 78, 156,
        ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
         "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
        ("malignant", "normal, benign")),
    "bloodmnist": MedSet(
        "BloodMNIST", "colour blood cell microscopy images", 3, "multi-class",
        11959, 1712, 3421,
        ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
         "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
        ("basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
         "monocyte", "neutrophil", "platelet")),
    "tissuemnist": MedSet(
        "TissueMNIST", "grayscale kidney cortex cell images", 1, "multi-class",
        165466, 23640, 47280,
        ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
         "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
        ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
         "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
         "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb")),
    "organamnist": MedSet(
        "OrganAMNIST", "grayscale abdominal CT slices, axial", 1, "multi-class",
        34561, 6491, 17778,
        ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
         "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
        _ORGANS, hflip=False),
    "organcmnist": MedSet(
        "OrganCMNIST", "grayscale abdominal CT slices, coronal", 1, "multi-class",
        12975, 2392, 8216,
        ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
         "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
        _ORGANS, hflip=False),
    "organsmnist": MedSet(
        "OrganSMNIST", "grayscale abdominal CT slices, sagittal", 1, "multi-class",
        13932, 2452, 8827,
        ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
         "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
        _ORGANS, hflip=False),
}


def file_stem(name: str, size: int) -> str:
    """The npz file's stem: ``pathmnist`` at 28×28, ``pathmnist_64`` etc. otherwise."""
    return name if size == 28 else f"{name}_{size}"
