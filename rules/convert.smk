rule convert:
    input:
        files=get_shard_files,
    output:
        directory(f"{RESULTS}/nifti/{{shard}}"),
    log:
        f"{LOGS}/convert/{{shard}}.log",
    conda:
        "../envs/dicom.yaml"
    threads: get_threads("convert")
    params:
        dicom_root=get_dicom_root,
        compression_level=config["convert"]["compression_level"],
    script:
        "../scripts/convert.py"
