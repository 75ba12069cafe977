"""Operations: the provider simulator, Procfile helpers, dashboards, alert rules, benchmarks."""
