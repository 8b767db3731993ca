"""Data: documents from a source, a tokenizer, a cached token file per split, and a stateless sampler.

    data = prepare_data(cfg.data)          # tokens cached under ~/.cache/hasten
    sampler = WindowSampler(data.train, seq_len, batch_size, seed, rank, world_size)
    x, y = sampler.batch(step, micro)
"""

from hasten.data.cache import TokenData, cache_root, prepare_data, unigram_cross_entropy
from hasten.data.sampler import WindowSampler
from hasten.data.sources import Document, load_documents, split_documents
from hasten.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "ByteTokenizer", "Document", "HFTokenizer", "TokenData", "Tokenizer", "WindowSampler", "build_tokenizer",
    "cache_root", "load_documents", "load_tokenizer", "prepare_data", "split_documents", "train_bpe",
    "unigram_cross_entropy",
]
