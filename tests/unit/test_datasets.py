"""GPT / MLM / T5 datasets, splits, blending, the index cache and resumable samplers."""
import os

import numpy as np
import pytest
import torch

from megatron_lsh.data import gpt_dataset as gpt_module
from megatron_lsh.data.blended import BlendedDataset, blended_sample_counts
from megatron_lsh.data.builder import (build_train_valid_test_datasets, parse_data_path,
                                       parse_split, split_document_ranges)
from megatron_lsh.data.errors import DataError
from megatron_lsh.data.gpt_dataset import GPTDataset
from megatron_lsh.data.indexed import write_dataset
from megatron_lsh.data.mlm_dataset import MLMDataset
from megatron_lsh.data.preprocess import PreprocessConfig, preprocess
from megatron_lsh.data.sampler import (MegatronPretrainingRandomSampler, MegatronPretrainingSampler,
                                       build_pretraining_data_loader)
from megatron_lsh.data.special_tokens import SpecialTokenIds
from megatron_lsh.data.t5_dataset import T5Dataset, noise_span_counts
from megatron_lsh.tokenizer import build_tokenizer
from tests.fixtures.data_helpers import excerpt_texts, train_tiny_bpe, write_jsonl

VOCAB = 1000
SPECIAL = SpecialTokenIds(vocab_size=VOCAB + 5 + 40, pad=VOCAB, cls=VOCAB + 1, sep=VOCAB + 2,
                          mask=VOCAB + 3, eod=VOCAB + 4, sentinels=tuple(range(VOCAB + 5, VOCAB + 45)))


def _dataset(tmp_path, n_docs=30, seed=0, max_sentences=6, max_len=20, coded=False, name="ds"):
    """Random documents of random sentences; ``coded``: every token of document d is 10 + d."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        sentences = []
        for _ in range(int(rng.integers(1, max_sentences + 1))):
            n = int(rng.integers(1, max_len + 1))
            sentences.append([10 + d] * n if coded else rng.integers(10, VOCAB, n).tolist())
        docs.append(sentences)
    prefix = str(tmp_path / name)
    write_dataset(prefix, docs, np.uint16)
    return prefix, docs


def _stream(docs, order=None):
    flat = [s for doc in docs for s in doc]
    order = range(len(flat)) if order is None else order
    return np.concatenate([np.asarray(flat[i], dtype=np.int64) for i in order])


# --- GPT ------------------------------------------------------------------------------------

def test_gpt_epoch_covers_every_token_once_in_document_order(tmp_path):
    prefix, docs = _dataset(tmp_path)
    ds = GPTDataset(prefix, None, None, 16, seed=1, shuffle=False)
    stream = _stream(docs)
    n = len(ds)
    assert n == (len(stream) - 1) // 16 and ds.num_epochs == 1
    inputs = np.concatenate([ds.raw_sample(i)[:-1] for i in range(n)])
    assert np.array_equal(inputs, stream[:n * 16])  # every position exactly once, in order
    assert len(stream) - n * 16 <= 16  # only a tail shorter than a sample is never an input
    for i in range(n):
        assert np.array_equal(ds.raw_sample(i), stream[i * 16:i * 16 + 17])
        item = ds[i]
        assert torch.equal(item["tokens"], torch.from_numpy(stream[i * 16:i * 16 + 16]))
        assert torch.equal(item["labels"], torch.from_numpy(stream[i * 16 + 1:i * 16 + 17]))


def test_gpt_shuffled_epoch_is_a_permutation_of_documents_and_samples(tmp_path):
    prefix, docs = _dataset(tmp_path)
    ds = GPTDataset(prefix, None, None, 16, seed=3)
    n_seq = sum(len(d) for d in docs)
    assert sorted(ds.doc_idx.tolist()) == list(range(n_seq))
    assert sorted(ds.shuffle_idx.tolist()) == list(range(len(ds)))
    assert ds.doc_idx.tolist() != list(range(n_seq))
    stream = _stream(docs, ds.doc_idx)
    position = np.argsort(ds.shuffle_idx)  # served index of each stream window
    for j in range(len(ds)):
        assert np.array_equal(ds.raw_sample(int(position[j])), stream[j * 16:j * 16 + 17])


@pytest.mark.parametrize("extra,separate", [(3, True), (0.9, False)])
def test_gpt_epochs_and_separate_last_epoch(tmp_path, extra, separate):
    prefix, docs = _dataset(tmp_path)
    per_epoch = GPTDataset(prefix, None, None, 8, seed=1, shuffle=False).num_samples
    extra = extra if isinstance(extra, int) else int(extra * per_epoch)
    ds = GPTDataset(prefix, None, 2 * per_epoch + extra, 8, seed=5)
    n_seq = sum(len(d) for d in docs)
    assert ds.num_epochs == 3 and len(ds) == 2 * per_epoch + extra
    for e in range(3):
        assert sorted(ds.doc_idx[e * n_seq:(e + 1) * n_seq].tolist()) == list(range(n_seq))
    first = (2 * ds.tokens_per_epoch - 1) // 8
    head = np.asarray(ds.shuffle_idx[:first])
    assert bool(np.all(head < first)) == separate


def test_gpt_split_ranges_stay_inside_their_documents(tmp_path):
    prefix, docs = _dataset(tmp_path, coded=True)
    ds = GPTDataset(prefix, (5, 20), 200, 8, seed=2, name="valid")
    seen = set()
    for i in range(len(ds)):
        seen.update(ds.raw_sample(i).tolist())
    assert seen == set(range(15, 30))


def test_gpt_eod_mask_loss(tmp_path):
    prefix, _ = _dataset(tmp_path, coded=True)
    ds = GPTDataset(prefix, None, None, 8, seed=2, eod=12, eod_mask_loss=True)
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(item["loss_mask"] == 0, item["tokens"] == 12)


def test_gpt_bad_arguments(tmp_path):
    prefix, _ = _dataset(tmp_path, n_docs=2, max_sentences=1, max_len=3)
    with pytest.raises(DataError, match="fewer than the 33 one sample needs"):
        GPTDataset(prefix, None, 10, 32, seed=1)
    with pytest.raises(DataError, match=r"document range \[1, 5\) is outside the 2 documents"):
        GPTDataset(prefix, (1, 5), 10, 2, seed=1)
    with pytest.raises(DataError, match="num_samples must be non-negative"):
        GPTDataset(prefix, None, -1, 2, seed=1)


def test_index_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    prefix, _ = _dataset(tmp_path)
    first = GPTDataset(prefix, None, 100, 16, seed=1)
    cache = tmp_path / "index-cache"
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and any(f.endswith("description.json") for f in files)

    def fail(*a, **k):
        raise AssertionError("indices rebuilt although cached")

    monkeypatch.setattr(gpt_module, "build_sample_idx", fail)
    again = GPTDataset(prefix, None, 100, 16, seed=1)
    assert isinstance(again.sample_idx, np.memmap)
    assert np.array_equal(first.shuffle_idx, again.shuffle_idx)
    assert all(np.array_equal(first.raw_sample(i), again.raw_sample(i)) for i in range(len(first)))
    monkeypatch.undo()
    GPTDataset(prefix, None, 100, 16, seed=2, cache_dir=str(tmp_path / "elsewhere"))
    assert sorted(os.listdir(cache)) == files and len(os.listdir(tmp_path / "elsewhere")) == 4


def test_index_cache_with_torch_distributed(tmp_path):
    import torch.distributed as dist

    prefix, _ = _dataset(tmp_path)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ds = GPTDataset(prefix, None, 50, 16, seed=1)
        assert len(ds) == 50 and len(os.listdir(tmp_path / "index-cache")) == 4
    finally:
        dist.destroy_process_group()


def test_gpt_on_real_text_detokenizes_to_the_corpus(tmp_path):
    vocab, merges, _ = train_tiny_bpe(tmp_path / "tok", vocab_size=400)
    spec = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges}
    texts = excerpt_texts()
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    preprocess(PreprocessConfig(input=path, output_prefix=str(tmp_path / "c"), tokenizer=spec),
               log=lambda m: None)
    tok = build_tokenizer(**spec)
    ds = GPTDataset(str(tmp_path / "c_text_document"), None, None, 64, seed=1, shuffle=False)
    inputs = np.concatenate([ds.raw_sample(i)[:-1] for i in range(len(ds))])
    text = tok.detokenize(inputs)
    assert len(text) > 0.9 * sum(map(len, texts)) and "".join(texts).startswith(text)


# --- MLM ------------------------------------------------------------------------------------

def test_mlm_masking_statistics_and_special_tokens(tmp_path):
    prefix, _ = _dataset(tmp_path, n_docs=40)
    ds = MLMDataset(prefix, None, 1500, 64, seed=1, special=SPECIAL)
    special = SPECIAL.all_ids
    candidates = predicted = masked = kept = randomized = 0
    for i in range(len(ds)):
        s = ds.masked_sample(i)
        tokens, labels, loss = s["tokens"], s["labels"], s["loss_mask"] == 1
        assert labels[0] == SPECIAL.cls and labels[-1] == SPECIAL.sep and len(labels) <= 64
        assert np.array_equal(labels[1:-1], ds.content(i))
        is_special = np.isin(labels, special)
        assert not loss[is_special].any() and np.array_equal(tokens[is_special], labels[is_special])
        assert np.array_equal(tokens[~loss], labels[~loss])
        n_cand = int((~is_special).sum())
        assert loss.sum() == max(1, round(0.15 * n_cand))
        candidates += n_cand
        predicted += int(loss.sum())
        masked += int((tokens[loss] == SPECIAL.mask).sum())
        kept += int((tokens[loss] == labels[loss]).sum())
        rand = loss & (tokens != SPECIAL.mask) & (tokens != labels)
        randomized += int(rand.sum())
        assert not np.isin(tokens[rand], special).any()
    assert abs(predicted / candidates - 0.15) < 0.005
    assert abs(masked / predicted - 0.8) < 0.02
    assert abs(kept / predicted - 0.1) < 0.015 and abs(randomized / predicted - 0.1) < 0.015


def test_mlm_items_are_padded_tensors(tmp_path):
    prefix, _ = _dataset(tmp_path)
    ds = MLMDataset(prefix, None, 50, 48, seed=1, special=SPECIAL, short_seq_prob=0.5)
    lengths = set()
    for i in range(len(ds)):
        item = ds[i]
        n = int(item["padding_mask"].sum())
        lengths.add(n)
        assert all(v.shape == (48,) for v in item.values())
        assert item["tokens"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
        assert (item["tokens"][n:] == SPECIAL.pad).all() and (item["loss_mask"][n:] == 0).all()
        assert item["labels"][n - 1] == SPECIAL.sep
    assert len(lengths) > 5  # short sequences vary the length


def test_mlm_masks_are_dynamic_across_epochs_and_deterministic(tmp_path):
    prefix, _ = _dataset(tmp_path)
    one_epoch = len(MLMDataset(prefix, None, None, 32, seed=1, special=SPECIAL))
    ds = MLMDataset(prefix, None, 3 * one_epoch, 32, seed=1, special=SPECIAL)
    by_span = {}
    for i in range(len(ds)):
        by_span.setdefault(tuple(ds.mapping[i][:2]), []).append(i)
    repeats = [v for v in by_span.values() if len(v) > 1]
    assert len(repeats) >= one_epoch // 2
    differ = sum(not np.array_equal(ds.masked_sample(a)["loss_mask"], ds.masked_sample(b)["loss_mask"])
                 for a, b, *_ in repeats)
    assert differ >= 0.9 * len(repeats)
    again = MLMDataset(prefix, None, 3 * one_epoch, 32, seed=1, special=SPECIAL)
    for i in range(0, len(ds), 7):
        assert all(np.array_equal(ds.masked_sample(i)[k], again.masked_sample(i)[k]) for k in ("tokens", "loss_mask"))


@pytest.mark.parametrize("cross", [True, False])
def test_sentence_packing_and_document_separators(tmp_path, cross):
    prefix, docs = _dataset(tmp_path, coded=True)
    ds = MLMDataset(prefix, None, None, 40, seed=1, special=SPECIAL, cross_documents=cross)
    total = 0
    for i in range(len(ds)):
        content = ds.content(i)
        parts = np.split(content, np.flatnonzero(content == SPECIAL.sep))
        doc_ids = [set(p[p != SPECIAL.sep].tolist()) for p in parts]
        assert all(len(d) == 1 for d in doc_ids)  # a separator between every two documents
        if not cross:
            assert len(parts) == 1
        total += int((content != SPECIAL.sep).sum())
    full = sum(len(s) for d in docs for s in d if len(s) <= 38)
    assert total >= full  # all sentences that fit are served (long ones truncated)


def test_mlm_warns_on_document_level_data(tmp_path):
    prefix = str(tmp_path / "docs")
    write_dataset(prefix, [list(range(10, 300)) for _ in range(5)], np.uint16)
    with pytest.warns(RuntimeWarning, match="looks document-level .* --split-sentences"):
        ds = MLMDataset(prefix, None, None, 32, seed=1, special=SPECIAL)
    assert len(ds) == 5 and len(ds.content(0)) == 30


# --- T5 -------------------------------------------------------------------------------------

def _reconstruct(sample, sentinels, eod):
    labels = sample["labels"].tolist()
    assert labels[-1] == eod
    spans, current = {}, None
    for t in labels[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in sample["encoder_tokens"].tolist():
        out.extend(spans.pop(t) if t in sentinels else [t])
    assert not spans  # every sentinel of the target was used once
    return np.asarray(out, dtype=np.int64)


def test_t5_inputs_and_targets_reconstruct_the_text(tmp_path):
    prefix, _ = _dataset(tmp_path, n_docs=40)
    ds = T5Dataset(prefix, None, 600, 64, seed=1, special=SPECIAL, decoder_seq_length=24)
    sentinels = set(SPECIAL.sentinels)
    noise = total = spans = 0
    for i in range(len(ds)):
        s = ds.corrupted_sample(i)
        content = ds.content(i)
        assert np.array_equal(_reconstruct(s, sentinels, SPECIAL.eod), content)
        assert s["decoder_tokens"][0] == SPECIAL.cls
        assert np.array_equal(s["decoder_tokens"][1:], s["labels"][:-1])
        used = [t for t in s["encoder_tokens"].tolist() if t in sentinels]
        assert used == list(SPECIAL.sentinels[:len(used)])  # <extra_id_0>, <extra_id_1>, ... in order
        noise += len(s["labels"]) - 1 - len(used)
        spans += len(used)
        total += len(content)
    assert abs(noise / total - 0.15) < 0.01
    assert 2.6 < noise / spans < 3.4


def test_t5_items_are_padded_tensors(tmp_path):
    prefix, _ = _dataset(tmp_path)
    ds = T5Dataset(prefix, None, 20, 64, seed=1, special=SPECIAL, decoder_seq_length=24)
    item = ds[3]
    assert item["encoder_tokens"].shape == (64,) and item["labels"].shape == (24,)
    n = int(item["decoder_padding_mask"].sum())
    assert torch.equal(item["loss_mask"], item["decoder_padding_mask"].float())
    assert item["labels"][n - 1] == SPECIAL.eod and (item["labels"][n:] == SPECIAL.pad).all()
    m = int(item["encoder_padding_mask"].sum())
    assert (item["encoder_tokens"][m:] == SPECIAL.pad).all() and m <= 64


def test_t5_configuration_errors(tmp_path):
    prefix, _ = _dataset(tmp_path)
    few = SpecialTokenIds(VOCAB + 7, VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3, VOCAB + 4, (VOCAB + 5, VOCAB + 6))
    noise, spans = noise_span_counts(512, 0.15, 3.0)
    assert (noise, spans) == (77, 26)
    with pytest.raises(DataError, match="need 26 sentinel tokens .* vocab_extra_ids >= 26"):
        T5Dataset(prefix, None, 10, 512, 1, few, decoder_seq_length=128)
    with pytest.raises(DataError, match="decoder_seq_length 64 is too short .* up to 104 tokens"):
        T5Dataset(prefix, None, 10, 512, 1, SPECIAL, decoder_seq_length=64)


# --- splits, data paths, blending, builder ----------------------------------------------------

def test_parse_split():
    assert split_document_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges("98/2", 42) == [(0, 41), (41, 42), (42, 42)]
    assert split_document_ranges([1, 0, 0], 7) == [(0, 7), (7, 7), (7, 7)]
    assert parse_split("100") == [1.0, 0.0, 0.0]
    for bad in ("", "a,b", "1,2,3,4", "0,0", "-1,2"):
        with pytest.raises(DataError, match="split must be"):
            parse_split(bad)


def test_parse_data_path():
    assert parse_data_path(["a"]) == (["a"], [1.0])
    assert parse_data_path("0.3 a 0.7 b") == (["a", "b"], [0.3, 0.7])
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)   # blended by tokens
    with pytest.raises(DataError, match="alternate weights and prefixes"):
        parse_data_path(["0.3", "a", "0.7"])
    with pytest.raises(DataError, match="not a non-negative number"):
        parse_data_path(["0.3", "a", "x", "b"])


def test_blended_dataset_follows_weights(tmp_path):
    a, _ = _dataset(tmp_path, coded=True, name="a")
    b, _ = _dataset(tmp_path, coded=True, seed=1, name="b")
    counts = blended_sample_counts([1, 3], 400)
    parts = [GPTDataset(a, None, counts[0], 8, seed=1), GPTDataset(b, None, counts[1], 8, seed=1)]
    blend = BlendedDataset(parts, [1, 3], 400)
    assert blend.counts().tolist() == [100, 300]
    assert torch.equal(blend[1]["tokens"], parts[int(blend.dataset_index[1])][int(blend.dataset_sample_index[1])]["tokens"])
    with pytest.raises(DataError, match="has 10 samples but the blend of 400 needs"):
        BlendedDataset([GPTDataset(a, None, 10, 8, seed=1), parts[1]], [1, 3], 400)


def test_builder_splits_and_blends(tmp_path):
    a, _ = _dataset(tmp_path, n_docs=100, max_sentences=2, name="a")
    b, _ = _dataset(tmp_path, n_docs=100, max_sentences=2, seed=1, name="b")
    train, valid, test = build_train_valid_test_datasets(
        "gpt", data_path=[a], split="90,10,0", num_samples=(100, 20, 10), seq_length=8, seed=1)
    assert train.document_range == (0, 90) and valid.document_range == (90, 100) and test is None
    train, valid, test = build_train_valid_test_datasets(
        "mlm", data_path=["0.25", a, "0.75", b], split="80,10,10", num_samples=(200, 40, 0),
        seq_length=32, seed=1, special=SPECIAL, mask_prob=0.2)
    assert isinstance(train, BlendedDataset) and len(train) == 200 and test is None
    assert train.counts().tolist() == [50, 150] and train.datasets[0].mask_prob == 0.2
    assert valid.datasets[1].document_range == (80, 90)
    train, valid, test = build_train_valid_test_datasets(
        "t5", train_data_path=[a], valid_data_path=[b], num_samples=(30, 5, 5), seq_length=64,
        seed=1, special=SPECIAL, decoder_seq_length=24)
    assert len(train) == 30 and valid.indexed.prefix == b and test is None
    with pytest.raises(DataError, match="not both"):
        build_train_valid_test_datasets("gpt", data_path=[a], train_data_path=[a],
                                        num_samples=(1, 1, 1), seq_length=8, seed=1)
    with pytest.raises(DataError, match="need the tokenizer's special token ids"):
        build_train_valid_test_datasets("mlm", data_path=[a], num_samples=(1, 0, 0), seq_length=8, seed=1)


# --- samplers -------------------------------------------------------------------------------

def _batches(sampler_cls, consumed, dp, micro=3, total=50, limit=None, **kw):
    out = []
    for rank in range(dp):
        it = iter(sampler_cls(total, consumed, micro, rank, dp, **kw))
        out.append([next(it) for _ in range(limit)] if limit else list(it))
    return out


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_sequential_sampler_resumes_exactly(dp):
    full = _batches(MegatronPretrainingSampler, 0, dp)
    gb = 3 * dp
    all_samples = sorted(i for rank in full for b in rank for i in b)
    assert all_samples == list(range(50 - 50 % gb))  # every sample once, per global batch
    for step in range(1, len(full[0])):
        resumed = _batches(MegatronPretrainingSampler, step * gb, dp)
        assert all(resumed[r] == full[r][step:] for r in range(dp))
    tail = list(MegatronPretrainingSampler(50, 48, 3, 0, 2, drop_last=False))
    assert tail == [[48, 49]] and len(MegatronPretrainingSampler(50, 48, 3, 1, 2, drop_last=False)) == 0


def test_random_sampler_resumes_exactly_across_epochs():
    full = _batches(MegatronPretrainingRandomSampler, 0, 2, limit=30, seed=9)
    epoch0 = sorted(i for rank in full for b in rank[:8] for i in b)
    assert epoch0 == sorted(set(epoch0)) and len(epoch0) == 48  # one epoch: each sample at most once
    for step in (1, 7, 8, 9, 20):
        resumed = _batches(MegatronPretrainingRandomSampler, step * 6, 2, limit=30 - step, seed=9)
        assert all(resumed[r] == full[r][step:] for r in range(2))
    with pytest.raises(DataError, match="not a multiple of the global batch"):
        MegatronPretrainingRandomSampler(50, 5, 3, 0, 2)


def test_sampler_errors():
    with pytest.raises(DataError, match=r"consumed_samples \(50\) is not below total_samples \(50\)"):
        MegatronPretrainingSampler(50, 50, 2, 0, 1)
    with pytest.raises(DataError, match="data_parallel_rank 2 is outside 0..1"):
        MegatronPretrainingSampler(50, 0, 2, 2, 2)
    with pytest.raises(DataError, match="micro_batch_size must be positive"):
        MegatronPretrainingSampler(50, 0, 0, 0, 1)


def test_data_loader_resume_yields_the_same_tensors(tmp_path):
    prefix, _ = _dataset(tmp_path)
    ds = GPTDataset(prefix, None, 60, 8, seed=1)
    full = [b["tokens"] for b in build_pretraining_data_loader(ds, 0, 2, 1, 2)]
    resumed = [b["tokens"] for b in build_pretraining_data_loader(ds, 5 * 4, 2, 1, 2)]
    assert len(resumed) == len(full) - 5 and all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
