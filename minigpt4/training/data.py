"""Examples -> training batches: tokenised with conversation.encode_example (encode_dialogue for
a whole dialogue), images as pixels or as cached image features, bad rows skipped (and counted)
before training starts.

Feature cache: with the ViT, ln_vision, Q-Former and queries frozen, the image side's output
(the Q-Former tokens before llama_proj, [Q, proj_in] per image) is the same at every epoch.
Preprocessing is a deterministic resize, so computing it once per image is exact and spares
the ViT-g forward pass (about a third of a 7B training step) from every step.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from minigpt4.build import LoadedModel
from minigpt4.conversation import encode_dialogue, encode_example, pad_batch
from minigpt4.data.datasets import BadRow, Example, ImageRef, build_examples, open_image
from minigpt4.errors import UserError
from minigpt4.images import preprocess
from minigpt4.model import MiniGPT4
from minigpt4.settings import DataOptions, TrainerOptions
from minigpt4.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """ref -> row of `features` [N_images, Q, proj_in] (kept on the CPU)."""

    index: dict[ImageRef, int] = field(default_factory=dict)
    features: torch.Tensor | None = None

    def lookup(self, refs: list[ImageRef]) -> torch.Tensor:
        return self.features[[self.index[r] for r in refs]]


class _Pictures(Dataset):
    """Unique image references -> pixels (None for an unreadable one), for scanning and caching."""

    def __init__(self, refs: list[ImageRef], image_size: int, picture_size: int):
        self.refs, self.image_size, self.picture_size = refs, image_size, picture_size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        try:
            return i, preprocess(open_image(self.refs[i], self.picture_size), self.image_size), ""
        except UserError as err:
            return i, None, str(err)


def _collate_pictures(items):
    good = [(i, px) for i, px, _ in items if px is not None]
    bad = [(i, why) for i, px, why in items if px is None]
    pixels = torch.stack([px for _, px in good]) if good else None
    return [i for i, _ in good], pixels, bad


@torch.no_grad()
def scan_images(refs: list[ImageRef], image_size: int, picture_size: int, num_workers: int,
                model: MiniGPT4 | None = None, batch_size: int = 32,
                progress: bool = False) -> tuple[FeatureCache | None, dict[ImageRef, str]]:
    """Open every image once: -> (feature cache if a model is given, {bad ref: reason}).
    progress: a bar on stderr (this can take a minute before training starts)."""
    loader = DataLoader(_Pictures(refs, image_size, picture_size), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate_pictures)
    bad: dict[ImageRef, str] = {}
    cache = FeatureCache() if model is not None else None
    chunks = []
    bar = tqdm(total=len(refs), unit="image", disable=not progress,
               desc="caching image features" if model is not None else "checking images")
    for ids, pixels, failures in loader:
        bar.update(len(ids) + len(failures))
        for i, why in failures:
            bad[refs[i]] = why
        if cache is not None and pixels is not None:
            feats = model.image_features(pixels)  # [b,Q,proj_in]
            for i in ids:
                cache.index[refs[i]] = len(cache.index)
            chunks.append(feats.cpu())
    bar.close()
    if cache is not None:
        cache.features = torch.cat(chunks) if chunks else torch.zeros(0)
    return cache, bad


def _worker_init(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the training process, which stops after
    the current step (training/trainer.py StopRequest): a worker killed by a signal sent to the
    whole process group would break that step with a DataLoader traceback. Workers still exit
    when the training process ends or dies. Then Lightning's seeding (seed_everything(workers=True))."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pl_worker_init_function(worker_id)


class FinetuneDataset(Dataset):
    """Examples -> {ids, labels, pixels | features}; a row whose image fails to open -> None."""

    def __init__(self, examples: Sequence[Example], tokenizer_path: str, num_image_tokens: int, image_size: int,
                 picture_size: int = 224, max_target_tokens: int = 160, cache: FeatureCache | None = None):
        self.examples, self.tokenizer_path = examples, str(tokenizer_path)
        self.num_image_tokens, self.image_size, self.picture_size = num_image_tokens, image_size, picture_size
        self.max_target_tokens, self.cache = max_target_tokens, cache
        self._tokenizer: Tokenizer | None = None  # built lazily: one per DataLoader worker

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict | None:
        ex = self.examples[i]
        if ex.conversation is not None:  # a whole dialogue: every answer trains
            ids, labels = encode_dialogue(self.tokenizer.encode, ex.conversation, self.num_image_tokens,
                                          max_target_tokens=self.max_target_tokens)
        else:
            ids, labels = encode_example(self.tokenizer.encode, ex.prompt, ex.target, self.num_image_tokens,
                                         max_target_tokens=self.max_target_tokens)
        item = {"ids": ids, "labels": labels}
        if self.cache is not None:
            item["features"] = self.cache.lookup(ex.images)  # [n,Q,proj_in]
            return item
        try:
            pixels = [preprocess(open_image(r, self.picture_size), self.image_size) for r in ex.images]
        except UserError as err:  # unreadable since the scan: skip the row, never crash the epoch
            log.warning("skipping %s: %s", ex.row, err)
            return None
        item["pixels"] = torch.stack(pixels) if pixels else torch.zeros(0, 3, self.image_size, self.image_size)
        return item


def collate(items: list[dict | None], pad_id: int) -> dict | None:
    """Right-padded batch; images of all rows concatenated in row order (as model.embed fills them)."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    batch = pad_batch([x["ids"] for x in items], pad_id, side="right", labels=[x["labels"] for x in items])
    key = "features" if "features" in items[0] else "pixels"
    batch[key] = torch.cat([x[key] for x in items])  # [N_images, ...]
    batch["n_samples"] = len(items)
    return batch


class FinetuneDataModule(pl.LightningDataModule):
    """Builds the examples once (skipping bad rows with one warning), then serves shuffled batches.
    seed: cc_sbu_align's shuffling (the synthetic data has data.seed)."""

    def __init__(self, data: DataOptions, trainer: TrainerOptions, seed: int, lm: LoadedModel, cache_features: bool):
        super().__init__()
        self.data, self.trainer_options, self.seed = data, trainer, seed
        self.model, self.tokenizer, self.template, self.image_size = lm.model, lm.tokenizer, lm.template, lm.image_size
        self.cache_features = cache_features
        self.dataset: FinetuneDataset | None = None
        self.bad_rows: list[BadRow] = []
        self.n_rows = 0

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        data, trainer = self.data, self.trainer_options
        examples, bad = build_examples(data, self.template, self.seed)
        picture_size = data.picture_size or 224  # drawn pictures only (data=synthetic sets it); files ignore it
        cache = None
        synthetic_only = str(data.name) == "synthetic"
        if self.cache_features or not synthetic_only:  # files must be opened once; synthetic pictures cannot fail
            refs = list(dict.fromkeys(r for ex in examples for r in ex.images))
            was_training = self.model.training
            self.model.eval()
            cache, unreadable = scan_images(refs, self.image_size, picture_size, trainer.num_workers,
                                            self.model if self.cache_features else None,
                                            progress=bool(trainer.progress_bar))
            self.model.train(was_training)
            if unreadable:
                kept = []
                for ex in examples:
                    why = next((unreadable[r] for r in ex.images if r in unreadable), None)
                    (bad.append(BadRow(ex.row, why)) if why else kept.append(ex))
                examples = kept
        self.n_rows = len(examples) + len(bad)
        self.bad_rows = bad
        if bad:
            listed = "; ".join(f"{b.row}: {b.reason}" for b in bad[:20])
            more = f"; ... (+{len(bad) - 20} more)" if len(bad) > 20 else ""
            log.warning("skipped %d of %d rows: %s%s", len(bad), self.n_rows, listed, more)
        if not len(examples):
            raise UserError(f"data={data.name}: no usable rows ({len(bad)} skipped)")
        self.dataset = FinetuneDataset(examples, self.tokenizer.path, self.model.num_image_tokens, self.image_size,
                                       picture_size, trainer.max_target_tokens, cache)

    def train_dataloader(self) -> DataLoader:
        workers = self.trainer_options.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.trainer_options.batch_size,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_id),
            worker_init_fn=_worker_init,
            drop_last=False,
        )
