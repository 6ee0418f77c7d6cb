#!/usr/bin/env python3
"""Read a gantry dataset the way Megatron-LM does, and time it: the peer of `gantry data
bench`, so gantry's reader is measured against the path most training runs use today, on
the same .bin/.idx files, in the same run.

Megatron-LM's data path (megatron/core/datasets), reproduced call for call:

* `indexed_dataset._IndexReader`: the .idx header is parsed with `struct`, then the
  arrays are zero-copy views, `np.frombuffer(memoryview(np.memmap(idx)), int32/int64,
  count=..., offset=...)`.
* `_MMapBinReader` + `MMapIndexedDataset.get(idx, offset, length)`: the .bin is
  `np.memmap(bin, mode='r', order='C')`; a piece of a sequence is
  `np.frombuffer(memoryview(bin), dtype, count=length, offset=pointer + offset * itemsize)`.
* `GPTDataset`: a sample index of (document, offset) at every sample boundary (Megatron
  builds it in its C++ helpers; here prefix sums and `np.searchsorted`, same entries), a
  seeded shuffle of the sample order, and per sample one `get` per document piece,
  `np.concatenate`, `.astype(np.int64)`. A batch is `np.stack` of its samples (what torch's
  `default_collate` does, minus the tensor).

The documents of all shards, in shard then document order, form one token stream; sample
i is tokens [i*seq_len, i*seq_len + seq_len + 1) of it, as in gantry's sampler, so both
sides read the same bytes. The reads are timed single-threaded from a warm page cache
(tokens counted = samples * (seq_len + 1)), then an `np.copyto` of as many bytes as those
tokens take in the .bin measures memcpy bandwidth as numpy sees it (as gantry's side does).
Prints one JSON line; exits 2 naming the file when the dataset is missing or malformed.
"""

import argparse
import json
import os
import struct
import sys
import time

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
MANIFEST_DTYPES = {"u8": 1, "i8": 2, "i16": 3, "i32": 4, "i64": 5, "f64": 6, "f32": 7, "u16": 8}
COPY_CHUNK = 256 << 20  # bytes per np.copyto in the memcpy measurement


class DatasetError(Exception):
    pass


class IndexedShard:
    """One PREFIX.idx/.bin pair: Megatron's MMapIndexedDataset, plus the checks it skips."""

    def __init__(self, prefix):
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: no such file")
        with open(idx_path, "rb") as f:
            header = f.read(34)
        if len(header) < 34 or header[:9] != MAGIC:
            raise DatasetError(f"{idx_path}: not an MMIDIDX index (bad magic or shorter than its header)")
        version, code, sequences, doc_entries = struct.unpack("<QBQQ", header[9:])
        if version != 1:
            raise DatasetError(f"{idx_path}: index version {version}, expected 1")
        if code not in DTYPES:
            raise DatasetError(f"{idx_path}: unknown dtype code {code}")
        self.code, self.dtype = code, np.dtype(DTYPES[code])
        expected = 34 + 12 * sequences + 8 * doc_entries
        if os.path.getsize(idx_path) != expected:
            raise DatasetError(f"{idx_path}: {sequences} sequences and {doc_entries} document entries "
                               f"need {expected} bytes, the file has {os.path.getsize(idx_path)}")
        # _IndexReader: the arrays are views into the mapped index.
        self._idx_mmap = np.memmap(idx_path, mode="r", order="C")
        idx_buffer = memoryview(self._idx_mmap)
        self.sequence_lengths = np.frombuffer(idx_buffer, dtype=np.int32, count=sequences, offset=34)
        self.sequence_pointers = np.frombuffer(idx_buffer, dtype=np.int64, count=sequences,
                                               offset=34 + self.sequence_lengths.nbytes)
        self.document_indices = np.frombuffer(idx_buffer, dtype=np.int64, count=doc_entries,
                                              offset=34 + 12 * sequences)
        bin_size = os.path.getsize(bin_path)
        ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        if sequences and (self.sequence_lengths.min() < 0 or self.sequence_pointers.min() < 0
                          or ends.max() > bin_size):
            raise DatasetError(f"{idx_path}: a sequence lies outside {bin_path} ({bin_size} bytes)")
        docs = self.document_indices
        if doc_entries < 1 or docs[0] != 0 or docs[-1] != sequences or np.any(np.diff(docs) < 0):
            raise DatasetError(f"{idx_path}: document indices must rise from 0 to {sequences}")
        # _MMapBinReader: the tokens are read through a memoryview of the mapped .bin.
        self.bin_path = bin_path
        self._bin_mmap = np.memmap(bin_path, mode="r", order="C") if bin_size else np.zeros(0, np.uint8)
        self._bin_buffer = memoryview(self._bin_mmap)

    def get(self, idx, offset=0, length=None):
        """MMapIndexedDataset.get: tokens offset..offset+length of sequence idx (a view)."""
        pointer, size = self.sequence_pointers[idx], self.sequence_lengths[idx]
        if length is None:
            length = size - offset
        pointer += offset * self.dtype.itemsize
        return np.frombuffer(self._bin_buffer, dtype=self.dtype, count=length, offset=pointer)

    def warm(self):
        """Read every page of the .bin through the mapping: page cache and page tables warm."""
        return int(self._bin_mmap[::4096].sum()) if self._bin_mmap.size else 0


class PackedSamples:
    """GPTDataset over the concatenated shards: sample index, shuffle index, __getitem__."""

    def __init__(self, shards, seq_len, seed, source):
        self.shards = shards
        counts = [len(s.sequence_lengths) for s in shards]
        # Global document d is sequence document_index[d] of shard dataset_index[d].
        self.dataset_index = np.repeat(np.arange(len(shards)), counts)
        self.document_index = np.concatenate([np.arange(c) for c in counts])
        lengths = np.concatenate([s.sequence_lengths for s in shards]).astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)))
        total = int(starts[-1])
        self.num_samples = (total - 1) // seq_len if total else 0
        if self.num_samples < 1:
            raise DatasetError(f"{source}: the dataset holds {total} tokens, "
                               f"one sample needs seq_len + 1 = {seq_len + 1}")
        # Entry k: the document holding token k*seq_len and the offset in it; sample i runs
        # from entry i to entry i+1 inclusive (Megatron's build_sample_idx).
        boundaries = np.arange(self.num_samples + 1, dtype=np.int64) * seq_len
        docs = np.searchsorted(starts, boundaries, side="right") - 1
        self.sample_index = np.stack([docs, boundaries - starts[docs]], axis=1)
        self.shuffle_index = np.random.RandomState(seed).permutation(self.num_samples)

    def _get(self, doc, offset=0, length=None):
        return self.shards[self.dataset_index[doc]].get(self.document_index[doc], offset, length)

    def __getitem__(self, idx):
        idx = self.shuffle_index[idx]
        doc_beg, doc_beg_offset = self.sample_index[idx]
        doc_end, doc_end_offset = self.sample_index[idx + 1]
        if doc_beg == doc_end:
            parts = [self._get(doc_beg, doc_beg_offset, doc_end_offset - doc_beg_offset + 1)]
        else:
            parts = []
            for doc in range(doc_beg, doc_end + 1):
                offset = 0 if doc > doc_beg else doc_beg_offset
                length = None if doc < doc_end else doc_end_offset + 1
                parts.append(self._get(doc, offset, length))
        return np.concatenate(parts).astype(np.int64)


def open_dataset(directory):
    manifest_path = os.path.join(directory, "manifest.json")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        prefixes = [shard["prefix"] for shard in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{manifest_path}: not a gantry manifest ({e!r})") from e
    if not prefixes:
        raise DatasetError(f"{manifest_path}: no shards")
    shards = [IndexedShard(os.path.join(directory, p)) for p in prefixes]
    want = MANIFEST_DTYPES.get(manifest.get("dtype"))
    for shard, prefix in zip(shards, prefixes, strict=True):
        if shard.code != want:
            raise DatasetError(f"{directory}/{prefix}.idx: dtype {shard.dtype.name} "
                               f"but {manifest_path} says {manifest.get('dtype')!r}")
    return shards


def time_reads(samples, batch, seconds):
    """Assemble shuffled batches for `seconds` or until every sample is read."""
    done, start = 0, time.perf_counter()
    deadline = start + seconds
    while done < samples.num_samples:
        stop = min(done + batch, samples.num_samples)
        np.stack([samples[i] for i in range(done, stop)])
        done = stop
        if time.perf_counter() >= deadline:
            break
    return done, time.perf_counter() - start


def memcpy_gbps(nbytes):
    """np.copyto of nbytes, in blocks of at most COPY_CHUNK, between two preallocated arrays."""
    nbytes = max(nbytes, 1)
    block = min(nbytes, COPY_CHUNK)
    src, dst = np.full(block, 1, np.uint8), np.zeros(block, np.uint8)
    np.copyto(dst, src)  # fault the pages in before timing
    copied, start = 0, time.perf_counter()
    while copied < nbytes:
        n = min(block, nbytes - copied)
        np.copyto(dst[:n], src[:n])
        copied += n
    return nbytes / max(time.perf_counter() - start, 1e-9) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="gantry dataset directory (manifest.json + PREFIX.idx/.bin)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.seq_len < 1 or args.batch < 1 or not args.seconds > 0:
        parser.error("--seq-len and --batch must be at least 1, --seconds above 0")
    try:
        shards = open_dataset(args.dir)
        samples = PackedSamples(shards, args.seq_len, args.seed, os.path.join(args.dir, "manifest.json"))
    except (DatasetError, OSError) as e:
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) else e
        print(f"megatron_read.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    for shard in shards:
        shard.warm()
    read, elapsed = time_reads(samples, args.batch, args.seconds)
    tokens = read * (args.seq_len + 1)
    print(json.dumps({
        "impl": "megatron-numpy", "seq_len": args.seq_len, "batch": args.batch,
        "samples": read, "tokens": tokens, "seconds": round(elapsed, 6),
        "tokens_per_s": round(tokens / elapsed),
        "memcpy_gbps": round(memcpy_gbps(tokens * shards[0].dtype.itemsize), 3),
    }))


if __name__ == "__main__":
    main()
