"""Speculative decoding: cheap guesses of a request's next tokens (spec/ngram.py from its own tokens,
spec/draft_model.py from a smaller or cheaper model) verified by the target model in one forward
(spec/verify.py), with the engine-side governor (spec/governor.py) deciding how many guesses each request
gets per step."""
