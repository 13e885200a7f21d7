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
    resources:
        **get_resources("convert"),
    params:
        source_root=get_source_root,
        images_table=bool(IMAGES_TABLE),
        compression_level=config["convert"]["compression_level"],
        uneven_spacing=config["convert"]["uneven_spacing"],
        gantry_tilt=config["convert"]["gantry_tilt"],
    script:
        "../scripts/convert.py"
