"""``SemiSupervisedDataModule``: labeled + unlabeled training loaders combined, and the val loader.

Training batches are ``{"labeled": {"image", "mask", "name"}, "unlabeled": {"image", "image_strong",
"valid", "name"}}`` from ``CombinedLoader(mode="max_size_cycle")``. An epoch is ONE pass over the unlabeled
set (``len(unlabeled) // batch_size_unlabeled`` batches, ``drop_last``); the labeled set cycles: its sampler
concatenates fresh random passes over the labeled images (UniMatch's repeated id list) until it has exactly
as many batches. The supervised baseline (``use_unlabeled=False``) keeps the same epoch length with the
labeled loader alone; with no unlabeled images (split "full") an epoch is one pass over the labeled set.

Under DDP, Lightning replaces the labeled sampler (a ``RandomSampler``) by a ``DistributedSampler`` over the
labeled set repeated to the epoch length, so every rank still has about one unlabeled pass of labeled batches.

Both training loaders resume inside an epoch exactly (``data.resumable``): their orders are functions of
``(seed, loader, epoch)``, each item's augmentation of ``(seed, loader, epoch, index)``, and their position is
saved in every checkpoint (Lightning's stateful-loader protocol).

Sources (``layout``): the folder layout's sub-folders (``split_dir`` unset: the synthetic set and a user's own
tree), or split lists ``<split_dir>/<split>/{labeled,unlabeled}.txt`` + ``<split_dir>/val.txt`` over a
``pascal``, ``cityscapes``, ``coco`` or ``folder`` tree (``data.splits``). Names are checked when the
datasets are built (``setup``); pixels in a sampled pre-pass of ``check_items`` items per set and again on
every load. Batch sizes are per device (per DDP process): the total batch is ``batch_size_labeled x devices x
num_nodes``.

Evaluation protocol (``val_mode``, ``val_crop_size``, ``val_stride`` -> :attr:`SemiSupervisedDataModule.eval_protocol`,
a ``models.inference.EvalProtocol``): ``whole`` image, ``center_crop`` to ``val_crop_size`` (done by the val
transform), or ``sliding`` windows of ``val_crop_size`` every ``val_stride`` pixels over the whole image (done by
the module, which ``train.build_module`` gives the same value).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from brpg_lightning.brpg import distributed as dist
from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.data.datasets.common import PairDataset, set_max_image_pixels
from brpg_lightning.data.datasets.folder import FolderDataset, read_classes_file
from brpg_lightning.data.datasets.synthetic import generate_synthetic, synthetic_class_names
from brpg_lightning.data.resumable import EpochSampler, ResumableLoader, SeededItems
from brpg_lightning.data.splits import LAYOUTS, SplitLists, load_split, make_layout, validate_split
from brpg_lightning.data.transforms import LabeledTransform, UnlabeledTransform, ValTransform
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol

log = logging.getLogger(__name__)



def worker_init(worker_id: int) -> None:
    """A loader worker ignores Ctrl-C: the terminal sends SIGINT to the whole process group, and a worker that died
    of it would fail the main process's next fetch before it checkpoints at the batch boundary
    (``callbacks.resume.PreemptionCheckpoint``). Seeds the worker as Lightning's own ``worker_init_fn`` would
    (which Lightning adds only where none is set)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)

class RepeatDataset(Dataset):
    """``dataset`` repeated ``times`` times: item ``i`` is ``dataset[i % len(dataset)]``.

    ``length`` (default ``times * len(dataset)``) cuts it to exactly the epoch's labeled items, so that
    under DDP the ``DistributedSampler`` gives each rank as many labeled as unlabeled batches.
    """

    def __init__(self, dataset: Dataset, times: int, length: int | None = None) -> None:
        self.dataset, self.times, self.base_len = dataset, int(times), len(dataset)  # type: ignore[arg-type]
        self.length = self.base_len * self.times if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % self.base_len]


def collate_val(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` with a one-line error when images of one val batch differ in size."""
    sizes = sorted({tuple(item["image"].shape[-2:]) for item in items})
    if len(sizes) > 1:
        raise BRPGInputError(
            f"val images {[item['name'] for item in items]} have different sizes {sizes}; "
            f"set dataset.batch_size_val=1 or dataset.val_mode=center_crop"
        )
    return default_collate(items)


MISSING_CLASSES: tuple[str, ...] = ("error", "warn")


def method_option(target: str) -> str:
    """The ``conf/method`` option of a method class path (``...methods.mean_teacher.MeanTeacher`` ->
    ``mean_teacher``), for messages.

    >>> method_option("brpg_lightning.methods.mean_teacher.MeanTeacher")
    'mean_teacher'
    """
    parts = str(target).split(".")
    return parts[-2] if len(parts) >= 2 else str(target)


def check_labeled_classes(
    counts: np.ndarray, read: int, total: int, class_names: Sequence[str], where: str | Path,
    missing_classes: str = "error",
) -> str | None:
    """Classes over the labeled masks (``counts``: pixels per mask value 0..255, from ``read`` of ``total``
    masks). Raises for masks that train no object class: only 0 and 255, only 255, only 0 (the usual cause:
    binary masks saved as 0/255, where 255 is the ignore index, so every foreground pixel is ignored and the run
    ends at mIoU 0 with exit status 0). A class that never occurs while the others do raises with
    ``missing_classes="error"`` when every mask was read; returns the message instead (for a warning) with
    ``"warn"`` or when only a sample was read (a rare class can be missing from a sample). None when all is well.

    >>> names = ["background", "cat", "dog"]
    >>> check_labeled_classes(np.bincount([0, 1, 2, 255], minlength=256), 4, 4, names, "l") is None
    True
    >>> check_labeled_classes(np.bincount([0, 0, 255], minlength=256), 3, 3, names[:2], "l")
    Traceback (most recent call last):
    ...
    brpg_lightning.errors.BRPGInputError: the labeled masks in 'l' hold only 0 and 255 (255 = ignore), so no pixel of class 1 ('cat') is ever trained; 0/255 masks: save foreground as 1 (255 marks pixels to ignore)
    """
    num_classes = len(class_names)
    present = [c for c in range(num_classes) if counts[c] > 0]
    ignored = int(counts[IGNORE_INDEX]) > 0
    objects = ", ".join(f"{c} ('{class_names[c]}')" for c in range(1, min(num_classes, 4)))
    objects = f"class{'es' if num_classes > 2 else ''} {objects}{', ...' if num_classes > 4 else ''}"
    if num_classes >= 2 and read and set(present) <= {0}:
        held = "0 and 255 (255 = ignore)" if present and ignored else "255 (ignore)" if ignored else "class 0"
        raise BRPGInputError(
            f"the labeled masks in '{where}' hold only {held}, so no pixel of {objects} is ever trained; "
            f"0/255 masks: save foreground as 1 (255 marks pixels to ignore)"
        )
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if not missing or not read:
        return None
    listed = ", ".join(f"{c} ('{class_names[c]}')" for c in missing[:SHOWN_CLASSES])
    more = f" (+{len(missing) - SHOWN_CLASSES} more)" if len(missing) > SHOWN_CLASSES else ""
    message = (
        f"class{'es' if len(missing) > 1 else ''} {listed}{more} never occur{'s' if len(missing) == 1 else ''} in "
        f"{'the' if read == total else f'{read} sampled of the'} {total} labeled masks of '{where}', so "
        f"{'it is' if len(missing) == 1 else 'they are'} never trained; is dataset.num_classes={num_classes} right? "
        f"(0/255 masks: save foreground as 1; a split that really lacks a class: dataset.missing_classes=warn)"
    )
    if missing_classes == "error" and read == total:
        raise BRPGInputError(message)
    return message


SHOWN_CLASSES = 5


class SemiSupervisedDataModule(pl.LightningDataModule):
    """Datamodule over the folder layout (``data.datasets.folder``), optionally generating the synthetic set.

    Args:
        name: dataset name (for messages; "synthetic" gets the synthetic class names by default).
        root: dataset root in the folder layout.
        num_classes: ``C``.
        split: labeled split name; checked against ``valid_splits`` as a string.
        valid_splits: accepted split names (None: any).
        crop_size: training crop side.
        batch_size_labeled, batch_size_unlabeled, batch_size_val: batch sizes ``B_l``, ``B_u``, val.
        num_workers, persistent_workers, pin_memory: ``DataLoader`` options (persistent only if workers > 0).
        use_unlabeled: load unlabeled images (False: the supervised baseline, same epoch length).
        scale_range, flip_p: weak augmentation (paper Sec. 4.1.5: 0.5-2.0, 0.5).
        strong: keyword arguments of ``transforms.StrongColor``.
        val_mode, val_crop_size, val_stride: evaluation protocol (``EvalProtocol.from_dataset``): ``whole``,
            ``center_crop`` (to ``val_crop_size``) or ``sliding`` (``val_crop_size`` windows every ``val_stride``
            px; None: 2/3 crop).
        layout: ``folder`` (default), ``pascal``, ``cityscapes`` or ``coco``.
        split_dir: split folder (``<split_dir>/<split>/labeled.txt`` ...); required by pascal/cityscapes/coco;
            for ``folder``, None reads the sub-folders.
        mask_dir: PASCAL mask folder (``SegmentationClassAug`` blended, ``SegmentationClass`` classic).
        label_format: Cityscapes masks: ``trainIds`` or ``labelIds`` (mapped by the official table).
        classes_file: folder layout: class names (and optional palette) file, see ``folder.read_classes_file``.
        check_items: items per set decoded and checked at setup (0: none); every load is checked anyway.
        max_image_pixels: largest image or mask (width x height) read; sets ``PIL.Image.MAX_IMAGE_PIXELS``
            (PIL's default 89478485; None: no limit). Every file's header is checked against it at setup (and
            images against OpenCV's own limit, ``OPENCV_IO_MAX_IMAGE_PIXELS``): ``common.too_large``.
        synthetic: keyword arguments of ``generate_synthetic`` (``prepare_data`` writes into ``root``); its
            ``split``/``num_classes`` default to this module's and must agree with them.
        class_names: one name per class (default: synthetic names, else ``class_<i>``).
        missing_classes: ``error`` (default): a class that never occurs in the labeled masks stops the run at
            setup; ``warn``: a warning (a small split of many classes, e.g. COCO's, can lack rare ones). Masks
            that hold no object class at all (0/255 binary masks) always stop it (:func:`check_labeled_classes`).
        class_census_items: labeled masks whose classes are counted at setup (all of them when the set is not
            larger; a larger set is sampled evenly and a missing class only warns). Masks only are decoded:
            about 2-40 ms each (PASCAL to Cityscapes sizes), so the default bounds the pass to about a minute.
        method: the training method's ``conf/method`` option, set by ``train.build_datamodule``; with
            ``use_unlabeled``, an empty unlabeled set is then an error naming it (the method would silently
            train on the labeled images alone).
        oracle_mask_dir: diagnostics only (``conf/experiment/diagnose``): folder of the unlabeled images'
            true masks; unlabeled batches then carry them as ``"mask"`` (same geometry as the weak view).
            None (default, every normal run): unlabeled batches carry no masks.
        strong_views: strong views per unlabeled item, the method's ``strong_views`` (set by
            ``train.build_datamodule``): 2 adds ``"image_strong2"`` (UniMatch).
        seed: the run's ``seed`` (set by ``train.build_datamodule``): the training loaders' orders and every
            item's augmentation are functions of it, the epoch and the item (``data.resumable``), so that a run
            resumed inside an epoch reads the same data.
    """

    def __init__(
        self,
        name: str,
        root: str,
        num_classes: int,
        split: str | int,
        valid_splits: list[str | int] | None = None,
        crop_size: int = 321,
        batch_size_labeled: int = 2,
        batch_size_unlabeled: int = 2,
        batch_size_val: int = 1,
        num_workers: int = 0,
        use_unlabeled: bool = True,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_p: float = 0.5,
        strong: dict[str, Any] | None = None,
        val_mode: str = "whole",
        val_crop_size: int | None = None,
        synthetic: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        persistent_workers: bool = False,
        pin_memory: bool | str = False,
        layout: str | None = None,
        split_dir: str | None = None,
        mask_dir: str | None = None,
        label_format: str | None = None,
        classes_file: str | None = None,
        val_stride: int | None = None,
        check_items: int = 8,
        max_image_pixels: int | None = 89_478_485,
        oracle_mask_dir: str | None = None,
        missing_classes: str = "error",
        class_census_items: int = 2000,
        method: str | None = None,
        strong_views: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        if missing_classes not in MISSING_CLASSES:
            raise BRPGInputError(f"dataset.missing_classes={missing_classes!r}; expected one of {', '.join(MISSING_CLASSES)}")
        self.missing_classes, self.class_census_items = str(missing_classes), int(class_census_items)
        self.method = None if method is None else str(method)
        self.oracle_mask_dir = None if oracle_mask_dir is None else Path(str(oracle_mask_dir))
        self.name = str(name)
        self.root = Path(str(root))
        self.num_classes = int(num_classes)
        self.split = validate_split(split, None if valid_splits is None else list(valid_splits), self.name)
        self.ignore_index = IGNORE_INDEX
        for key, value in (("batch_size_labeled", batch_size_labeled), ("batch_size_unlabeled", batch_size_unlabeled),
                           ("batch_size_val", batch_size_val), ("crop_size", crop_size)):
            if int(value) < 1:
                raise BRPGInputError(f"dataset.{key}={value}; expected an integer >= 1")
        if int(num_workers) < 0:
            raise BRPGInputError(f"dataset.num_workers={num_workers}; expected an integer >= 0")
        self.batch_size_labeled, self.batch_size_unlabeled = int(batch_size_labeled), int(batch_size_unlabeled)
        self.batch_size_val, self.num_workers = int(batch_size_val), int(num_workers)
        self.persistent_workers = bool(persistent_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.use_unlabeled = bool(use_unlabeled)
        self.check_items = int(check_items)
        set_max_image_pixels(max_image_pixels)

        self.layout_name = str(layout or "folder")
        if self.layout_name not in LAYOUTS:
            raise BRPGInputError(f"dataset.layout={self.layout_name!r}; expected one of {', '.join(LAYOUTS)}")
        self.split_dir = None if split_dir is None else Path(str(split_dir))
        if self.split_dir is None and self.layout_name != "folder":
            raise BRPGInputError(
                f"dataset.split_dir is not set; the {self.layout_name} layout reads <split_dir>/{self.split}/labeled.txt "
                f"(the published split folders, or tools.make_split's output)"
            )
        if self.split_dir is None and synthetic is None and self.name != "synthetic" and self.split != "folder":
            raise BRPGInputError(
                f"split={self.split} needs dataset.split_dir (a folder with {self.split}/labeled.txt, see "
                f"tools.make_split); split=folder reads the sub-folders of dataset.root"
            )
        self.layout = make_layout(self.layout_name, self.root, mask_dir, label_format)
        if self.split_dir is not None:
            self.layout.check_root()  # a wrong root fails before any model is built
        self.palette = None
        if classes_file is not None:
            names, self.palette = read_classes_file(str(classes_file))
            class_names = names if class_names is None else class_names
        if class_names is None and self.layout.class_names is not None:
            class_names = list(self.layout.class_names)

        self.synthetic = None if synthetic is None else self._synthetic_kwargs(dict(synthetic))
        if class_names is None:
            class_names = synthetic_class_names(self.num_classes) if self.synthetic is not None or \
                self.name == "synthetic" else [f"class_{i}" for i in range(self.num_classes)]
        self.class_names = [str(c) for c in class_names]
        if len(self.class_names) != self.num_classes and classes_file is not None and class_names is names:
            raise BRPGInputError(
                f"dataset.classes_file '{classes_file}' has {len(self.class_names)} class lines; expected "
                f"num_classes={self.num_classes} (one line per class id 0..{self.num_classes - 1}, background first)"
            )
        if len(self.class_names) != self.num_classes:
            raise BRPGInputError(
                f"dataset.class_names has {len(self.class_names)} names; expected num_classes={self.num_classes}"
            )

        self.labeled_transform = LabeledTransform(int(crop_size), tuple(scale_range), float(flip_p))
        self.unlabeled_transform = UnlabeledTransform(
            int(crop_size), tuple(scale_range), float(flip_p), dict(strong) if strong else None, int(strong_views)
        )
        self.eval_protocol = EvalProtocol.from_dataset(
            {"val_mode": val_mode, "val_crop_size": val_crop_size, "val_stride": val_stride}
        )
        self.val_transform = ValTransform(self.eval_protocol)

        self.labeled_set: PairDataset | None = None
        self.unlabeled_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.num_unlabeled_images = 0
        self._lists: SplitLists | None = None

    def _synthetic_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key, mine in (("split", self.split), ("num_classes", self.num_classes)):
            theirs = kwargs.setdefault(key, mine)
            if str(theirs) != str(mine):
                raise BRPGInputError(f"dataset.synthetic.{key}={theirs} differs from dataset.{key}={mine}")
        return kwargs

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Generate the synthetic dataset into ``root`` (skipped when its marker matches)."""
        if self.synthetic is not None:
            generate_synthetic(self.root, **self.synthetic, oracle_masks=self.oracle_mask_dir is not None)

    @property
    def uses_split_lists(self) -> bool:
        """Whether the sets come from split files (else from the folder layout's sub-folders)."""
        return self.split_dir is not None

    def _split_lists(self) -> SplitLists:
        if self._lists is None:
            assert self.split_dir is not None
            self._lists = load_split(self.layout, self.split_dir, self.split, need_unlabeled=self.use_unlabeled)
        return self._lists

    def _pair(self, samples: Any, transform: Any, with_masks: bool = True) -> PairDataset:
        return PairDataset(samples, self.num_classes, transform, with_masks, self.layout.lut, self.palette)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once (validating the layout): train sets for ``fit``, val for every stage."""
        if stage in (None, "fit"):
            self._build_train()
        if self.val_set is None:
            if self.uses_split_lists:
                self.val_set = self._pair(self._split_lists().val, self.val_transform)
            else:
                self.val_set = FolderDataset(self.root, "val", self.num_classes, self.val_transform, palette=self.palette)
            self.val_set.check_sample(self.check_items)

    def _build_train(self) -> None:
        if self.labeled_set is not None:
            return
        if self.uses_split_lists:
            lists = self._split_lists()
            labeled = self._pair(lists.labeled, self.labeled_transform)
            self.num_unlabeled_images = len(lists.unlabeled)
            if self.use_unlabeled:
                self.unlabeled_set = self._pair(lists.unlabeled, self.unlabeled_transform, with_masks=False)
            where_l, where_u = lists.files["labeled"], lists.files["unlabeled"]
        else:
            labeled = FolderDataset(self.root, "labeled", self.num_classes, self.labeled_transform, palette=self.palette)
            if self.use_unlabeled:
                self.unlabeled_set = FolderDataset(
                    self.root, "unlabeled", self.num_classes, self.unlabeled_transform, allow_empty=True,
                    hidden_mask_dir=self.oracle_mask_dir,
                )
                self.num_unlabeled_images = len(self.unlabeled_set)
            elif (self.root / "unlabeled" / "images").is_dir():  # SupOnly: count only, for the same epoch length
                self.num_unlabeled_images = len(FolderDataset(self.root, "unlabeled", self.num_classes, allow_empty=True))
            where_l, where_u = self.root / "labeled" / "images", self.root / "unlabeled" / "images"
        if self.use_unlabeled and self.method is not None and not self.num_unlabeled_images:
            raise BRPGInputError(
                f"no unlabeled images for a semi-supervised method (method={self.method}) in '{where_u}'; add "
                f"unlabeled images, or train on the labeled ones alone with method=supervised brpg=none"
            )
        if self.num_unlabeled_images and self.num_unlabeled_images < self.batch_size_unlabeled:
            raise BRPGInputError(
                f"'{where_u}' holds {self.num_unlabeled_images} images, fewer than "
                f"batch_size_unlabeled={self.batch_size_unlabeled}"
            )
        if not self.num_unlabeled_images and len(labeled) < self.batch_size_labeled:
            raise BRPGInputError(
                f"'{where_l}' holds {len(labeled)} images, fewer than batch_size_labeled={self.batch_size_labeled}"
            )
        labeled.check_sample(self.check_items)
        counts, read = labeled.mask_value_counts(self.class_census_items)
        where_masks = where_l if self.uses_split_lists else self.root / "labeled" / "masks"
        warning = check_labeled_classes(counts, read, len(labeled), self.class_names, where_masks, self.missing_classes)
        if warning is not None:
            log.warning("%s", warning)
        if self.unlabeled_set is not None:
            self.unlabeled_set.check_sample(min(self.check_items, 2))
        self.labeled_set = labeled

    @property
    def iterations_per_epoch(self) -> int:
        """Training batches per epoch: ``N_u // B_u`` when there are unlabeled images, else ``N_l // B_l``."""
        self._build_train()
        if self.num_unlabeled_images:
            return self.num_unlabeled_images // self.batch_size_unlabeled
        assert self.labeled_set is not None
        return len(self.labeled_set) // self.batch_size_labeled

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, loader_class: type[DataLoader] = DataLoader,
                **kwargs: Any) -> DataLoader:
        return loader_class(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            worker_init_fn=worker_init if self.num_workers > 0 else None,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def train_dataloader(self) -> CombinedLoader:
        """Both training loaders, resumable inside an epoch (``data.resumable``): orders from ``(seed, loader,
        epoch)``, each item's augmentation from ``(seed, loader, epoch, index)``."""
        self._build_train()
        assert self.labeled_set is not None
        iters = self.iterations_per_epoch
        n_l = len(self.labeled_set)
        if self.num_unlabeled_images:  # labeled cycles to exactly `iters` batches
            needed = iters * self.batch_size_labeled
            labeled_set: Dataset = RepeatDataset(self.labeled_set, math.ceil(needed / n_l), length=needed)
        else:
            needed, labeled_set = n_l, self.labeled_set
        loaders: dict[str, DataLoader] = {
            "labeled": self._train_loader(labeled_set, self.batch_size_labeled, 0, n_l, needed)}
        if self.use_unlabeled and self.unlabeled_set is not None and len(self.unlabeled_set):
            loaders["unlabeled"] = self._train_loader(self.unlabeled_set, self.batch_size_unlabeled, 1)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _train_loader(self, dataset: Dataset, batch_size: int, stream: int, base_len: int | None = None,
                      num_samples: int | None = None) -> DataLoader:
        items = SeededItems(dataset)
        sampler = EpochSampler(items, self.seed, stream, base_len=base_len, num_samples=num_samples)
        return self._loader(items, batch_size, sampler=sampler, drop_last=True, seed=self.seed, stream=stream,
                            loader_class=ResumableLoader)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        if dist.is_distributed():
            # Lightning's DistributedSampler would pad the last rank with repeated images (so that every rank
            # runs as many batches) and the synced mIoU would count those twice. Validation runs without
            # gradients, so DDP synchronises nothing per batch and the ranks may run different batch counts.
            sampler = UnrepeatedDistributedSampler(self.val_set, shuffle=False)
            return self._loader(self.val_set, self.batch_size_val, sampler=sampler, collate_fn=collate_val)
        return self._loader(self.val_set, self.batch_size_val, shuffle=False, collate_fn=collate_val)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
