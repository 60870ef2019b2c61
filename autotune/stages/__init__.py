"""The stages beyond the search, each reusing the engine and the search: the serving study over llama-server for N
concurrent users (``serving``), the speculative-decoding stage (``speculation``) and the draft-model check
(``draft``). May import every layer below: vocabulary, facts, memory, engine, search.
"""
