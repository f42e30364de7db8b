"""An example falkit plug-in (examples/plugin): `density`, information-density sampling
(Settles & Craven 2008), and `mlp2`, a two-layer MLP backbone. Installed, they are
`strategy = "density@G"` and `model.backbone = "mlp2"`; without installing, the same classes
are `strategy = "falkit_example.density:InformationDensity"` and so on."""
