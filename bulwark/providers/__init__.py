"""Provider adapters: the boundary where each upstream's wire format and failures are
translated into OpenAI wire types and classified `UpstreamError`s."""
