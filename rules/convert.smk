rule convert:
    input:
        files=f"{PRIVATE}/{C.SHARD_INDEX_DIR}/{{shard}}.tsv",
    output:
        directory(f"{RESULTS}/nifti/{{shard}}"),
    log:
        f"{LOGS}/convert/{{shard}}.log",
    conda:
        "../envs/dicom.yaml"
    threads: get_threads("convert")
    resources:
        **get_resources("convert"),
    params:
        dicom_root=get_dicom_root,
        compression_level=config["convert"]["compression_level"],
    script:
        "../scripts/convert.py"
