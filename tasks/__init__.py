"""Built-in evaluation tasks: perplexity, zero-shot accuracy through lm-eval, throughput (data: bench/data)."""
