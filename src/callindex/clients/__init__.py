"""Audited HTTP and LLM clients: every request and retry attempt recorded."""

from callindex.clients.http import AsyncAuditedHTTPClient, AuditedHTTPClient
from callindex.clients.llm import AsyncAuditedLLMClient, AuditedLLMClient, ChatResult, Usage
from callindex.clients.transport import AuditedTransport
from callindex.redaction import Redactor

__all__ = [
    "AsyncAuditedHTTPClient",
    "AsyncAuditedLLMClient",
    "AuditedHTTPClient",
    "AuditedLLMClient",
    "AuditedTransport",
    "ChatResult",
    "Redactor",
    "Usage",
]
