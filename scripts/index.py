"""Snakemake entry: index the input (a DICOM tree or an images table), join labels,
pseudonymise, assign shards; pseudonymise an official split table if one is given."""

import sys
from pathlib import Path

snakemake = globals()["snakemake"]
sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this workflow's radflow

import pandas as pd

from radflow import conventions as C
from radflow.runlog import log_to
from radflow.split import read_official_split
from radflow.tables import write_tsv

with log_to(snakemake.log[0]):
    key, _ = C.load_or_create_key(snakemake.input.key)
    data = snakemake.params.data
    if data.get("images_table"):
        from radflow.images import TableColumns, build_table_index

        columns = TableColumns.from_config(data["columns"])
        result = build_table_index(
            data["images_table"],
            columns=columns,
            positive_value=data["positive_value"],
            modality=data["modality"],
            reference_channel=data["reference_channel"],
            key=key,
            n_shards=snakemake.params.n_shards,
            threads=snakemake.threads,
            lesions_table=snakemake.input.lesions or None,
            excluded_lesions_table=snakemake.input.excluded_lesions or None,
        )
        patient_column = columns.patient
    else:
        from radflow.dicom.channels import CASE_KEYS
        from radflow.dicom.index import build_index

        result = build_index(
            data["dicom_root"],
            snakemake.input.labels or None,
            annotations_table=snakemake.input.annotations or None,
            masks_table=snakemake.input.masks or None,
            lesions_table=snakemake.input.lesions or None,
            excluded_lesions_table=snakemake.input.excluded_lesions or None,
            key=key,
            n_shards=snakemake.params.n_shards,
            threads=snakemake.threads,
            **{k: data[k] for k in ("label_key", "label_column", "positive_value", "patient_key",
                                    "reference_channel")},
            **{k: data[k] for k in CASE_KEYS if k in data},  # multi-series cases, masks
        )  # fmt: skip
        patient_column = data["patient_key"]
    result.write(
        Path(snakemake.output.series).parent, Path(snakemake.output.quarantine_paths).parent
    )
    print(result.summary_text())
    if snakemake.input.split_table:
        pseudo = C.Pseudonyms(key)
        official = read_official_split(
            snakemake.input.split_table,
            patient_column=patient_column,
            pseudonymise=lambda patient: pseudo("pat", patient),
        )
        write_tsv(official, snakemake.output.official_split)
        print(f"index: official split table: {len(official)} patients "
              f"({', '.join(f'{n} {s}' for s, n in official['split'].value_counts().items())})")  # fmt: skip
    else:
        # an empty table: the split stage makes its own patient-level split
        write_tsv(pd.DataFrame(columns=[C.PATIENT_PID, C.SPLIT, C.FOLD]),
                  snakemake.output.official_split)  # fmt: skip
