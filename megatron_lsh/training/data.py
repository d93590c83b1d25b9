"""Tokenizer, datasets and resumable loaders of a run, as the training loop needs them.

Every rank of a data-parallel replica (all its TP ranks and pipeline stages) reads the same
micro-batches; the sampler hands DP rank ``r`` its slice of each global batch, starting at
the consumed-sample count, so a resumed run draws exactly the batches an uninterrupted one
would have drawn. Validation always reads the same first ``eval_iters`` global batches, so
validation losses are comparable across a run and across runs. The dataset class and its
extra arguments come from the run's :class:`~megatron_lsh.training.tasks.Task` (``task``).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from megatron_lsh.config import ConfigError, MegatronLSHConfig
from megatron_lsh.data.sampler import iterate_keeping_rng
from megatron_lsh.parallel.dims import ProcessGroups


def build_run_tokenizer(config: MegatronLSHConfig):
    """The tokenizer named by the data config, or None when no tokenizer type is given."""
    data = config.data
    if not data.tokenizer_type:
        return None
    from megatron_lsh.tokenizer import build_tokenizer
    return build_tokenizer(data.tokenizer_type, vocab_file=data.vocab_file,
                           merge_file=data.merge_file, tokenizer_model=data.tokenizer_model,
                           vocab_extra_ids=data.vocab_extra_ids,
                           vocab_size=config.model.vocab_size)


def _check_data(config: MegatronLSHConfig, groups: ProcessGroups,
                log: Callable[[str], None]) -> None:
    """Rank 0 checks every dataset against the vocabulary; every rank raises its verdict."""
    import torch.distributed as dist
    from megatron_lsh.data.builder import parse_data_path
    from megatron_lsh.data.checks import check_token_ids
    from megatron_lsh.data.errors import DataError

    d = config.data
    problem = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        prefixes = [prefix for paths in (d.data_path, d.train_data_path, d.valid_data_path,
                                         d.test_data_path) if paths
                    for prefix in parse_data_path(paths)[0]]
        try:
            check_token_ids(prefixes, config.model.vocab_size, d.data_cache_path)
        except Exception as error:  # noqa: BLE001 - must reach the broadcast, or the others hang
            problem = str(error) if isinstance(error, DataError) else (
                f"checking the training data failed: {error}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem:
        error = DataError(problem)
        error.all_ranks = True
        raise error


def _with_mock_data(config: MegatronLSHConfig, tokenizer,
                    log: Callable[[str], None]) -> MegatronLSHConfig:
    """The config with ``--data-path`` set to the mock corpus (rank 0 writes it, others wait)."""
    import dataclasses

    import torch.distributed as dist
    from megatron_lsh.data.mock import mock_data_prefix

    vocab = tokenizer.base_vocab_size if tokenizer is not None else config.model.vocab_size
    eod = tokenizer.eod if tokenizer is not None else None
    args = (config.data.data_cache_path, vocab, config.model.seq_length, config.training.seed, eod)
    if not dist.is_initialized() or dist.get_rank() == 0:
        prefix = mock_data_prefix(*args)
        log(f"> --mock-data: random documents over {vocab} token ids in {prefix}")
    if dist.is_initialized():
        dist.barrier()
    prefix = mock_data_prefix(*args)   # exists now: only computes the name
    data = dataclasses.replace(config.data, mock_data=False, data_path=[prefix])
    return dataclasses.replace(config, data=data)


class RunData:
    """Train / validation datasets of a run and iterators over this rank's micro-batches."""

    def __init__(self, config: MegatronLSHConfig, task, groups: ProcessGroups,
                 global_batch_size: int, tokenizer, log: Callable[[str], None] = print):
        from megatron_lsh.data.builder import build_train_valid_test_datasets
        from megatron_lsh.data.special_tokens import SpecialTokenIds

        d = config.data
        if d.mock_data:
            config = _with_mock_data(config, tokenizer, log)
            d = config.data
        if not d.data_path and not d.train_data_path:
            raise ConfigError("no training data: pass --data-path PREFIX or --train-data-path "
                              "PREFIX (a preprocessed .bin/.idx prefix, optionally with blend "
                              "weights), or --mock-data for a smoke run")
        self.config, self.groups = config, groups
        self.global_batch_size = global_batch_size
        tr = config.training
        _check_data(config, groups, log)
        special = SpecialTokenIds.from_tokenizer(tokenizer) if tokenizer is not None else None
        num_samples = (tr.train_iters * global_batch_size,
                       max(tr.eval_iters, 1) * global_batch_size, 0)
        self.train, self.valid, _ = build_train_valid_test_datasets(
            task.dataset_class, seq_length=config.model.seq_length, seed=tr.seed,
            num_samples=num_samples, data_path=d.data_path or None, split=d.split,
            train_data_path=d.train_data_path or None, valid_data_path=d.valid_data_path or None,
            test_data_path=d.test_data_path or None,
            special=special, cache_dir=config.data.data_cache_path, log=log,
            **task.dataset_kwargs(config))
        if self.train is None:
            raise ConfigError(f"the split {d.split!r} leaves no training documents in "
                              f"{d.data_path}")

    @property
    def eval_iters(self) -> int:
        """Global batches per validation pass (``--eval-iters``)."""
        return self.config.training.eval_iters

    @property
    def has_valid(self) -> bool:
        """True when the split gives validation documents and eval_iters > 0."""
        return self.valid is not None and self.config.training.eval_iters > 0

    def _loader(self, dataset, consumed_samples: int):
        from megatron_lsh.data.sampler import build_pretraining_data_loader
        return build_pretraining_data_loader(
            dataset, consumed_samples, self.config.training.micro_batch_size,
            self.groups.dp_rank, self.groups.dp_size, num_workers=self.config.data.num_workers)

    def train_iterator(self, consumed_samples: int) -> Iterator:
        """Micro-batches of this DP rank from ``consumed_samples`` on."""
        return iterate_keeping_rng(self._loader(self.train, consumed_samples))

    def valid_iterator(self) -> Optional[Iterator]:
        """Micro-batches of the fixed validation set (from its start every time)."""
        return iterate_keeping_rng(self._loader(self.valid, 0)) if self.has_valid else None


def build_data(config: MegatronLSHConfig, task, groups: ProcessGroups,
               global_batch_size: int, tokenizer=None,
               log: Callable[[str], None] = print) -> RunData:
    """Build the run's datasets (indices are built once on rank 0 and cached)."""
    return RunData(config, task, groups, global_batch_size, tokenizer, log=log)
