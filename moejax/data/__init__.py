"""Data: tokenizers, the embedded TFDS corpus (no TensorFlow) and the grain pipeline."""

from moejax.data.corpus import MoejaxText
from moejax.data.corpus import TextSource
from moejax.data.corpus import list_corpus_files
from moejax.data.corpus import load_source
from moejax.data.corpus import read_corpus
from moejax.data.corpus import split_files
from moejax.data.pipeline import DataBundle
from moejax.data.pipeline import build_data
from moejax.data.pipeline import gather_windows
from moejax.data.pipeline import tokenize_documents
from moejax.data.tokenizers import ByteTokenizer
from moejax.data.tokenizers import SentencePieceTokenizer
from moejax.data.tokenizers import Tokenizer
from moejax.data.tokenizers import make_tokenizer

__all__ = [
    "ByteTokenizer", "DataBundle", "MoejaxText", "SentencePieceTokenizer", "TextSource",
    "Tokenizer", "build_data", "gather_windows", "list_corpus_files", "load_source",
    "make_tokenizer", "read_corpus", "split_files", "tokenize_documents",
]
