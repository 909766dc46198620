"""minillm.rag: text splitting, a persistent document store on the top-k kernel, retrieval-augmented generation."""
from minillm.rag.embedders import HashingEmbedder, ModelEmbedder, SentenceEncoderEmbedder, default_embedder
from minillm.rag.pipeline import RAGModel
from minillm.rag.splitter import DocumentProcessor
from minillm.rag.store import SimpleDocumentStore

__all__ = ["DocumentProcessor", "SimpleDocumentStore", "RAGModel", "HashingEmbedder", "SentenceEncoderEmbedder",
           "ModelEmbedder", "default_embedder"]
