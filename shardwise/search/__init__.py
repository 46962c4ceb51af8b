"""`shardwise plan`: search every legal parallel plan, keep those that fit, rank, explain."""

from shardwise.search.core import DEFAULT_HEADROOM, SearchResult, run_search, search

__all__ = ["DEFAULT_HEADROOM", "SearchResult", "run_search", "search"]
