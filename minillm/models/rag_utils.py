"""The seed's module name for RAG (`from minillm.models.rag_utils import SimpleDocumentStore, DocumentProcessor, RAGModel`)."""
from minillm.rag import DocumentProcessor, RAGModel, SimpleDocumentStore

__all__ = ["SimpleDocumentStore", "DocumentProcessor", "RAGModel"]
