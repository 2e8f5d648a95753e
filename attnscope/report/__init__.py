"""Reports: tables joined with the OlmPool registry, statistics, figures, interactive views, HTML.

    tables       the only reader of a batch store; DataFrames per model x revision x probe, per layer
    stats        OLS fits, leave-one-out R², correlations with bootstrap CIs (statsmodels, scipy)
    figures      matplotlib figures (PDF + PNG + JSON sidecar) and the registry behind `attnscope figures`
    interactive  the same figures in plotly, and the attention-pattern viewer
    accessor     `ds.attnscope.sink_heatmap()` etc. on analyze() results (registered by `import attnscope`)
    html         `attnscope report`: markdown, CSV, JSON and one self-contained HTML page

See docs/report.md. Submodules are imported on use so `import attnscope` stays light.
"""
