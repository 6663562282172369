"""python -m vqvae.convert {taming,llamagen,maskgit} FILE --workdir W [--preset NAME]
python -m vqvae.convert export W --to DIR [--full] | --to-taming FILE | --to-llamagen FILE
python -m vqvae.convert unpack DIR --workdir W   (a --full export -> a workdir that resumes)"""

import argparse
import sys

from vqvae.convert import FAMILIES, ConvertError, convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqvae.convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        s = sub.add_parser(family, help=f"import a released {family} checkpoint")
        s.add_argument("file")
        s.add_argument("--workdir", required=True, help="the new workdir to write")
        s.add_argument("--preset", help="a preset name or a .json model config")
    e = sub.add_parser("export", help="write a workdir's tokenizer out")
    e.add_argument("workdir")
    e.add_argument("--step", type=int)
    e.add_argument("--to", help="folder for model.safetensors and config.json")
    e.add_argument("--full", action="store_true", help="also the training state")
    e.add_argument("--to-taming", help="a .safetensors/.ckpt file in taming's layout")
    e.add_argument("--to-llamagen", help="a .safetensors/.pt file in LlamaGen's layout")
    u = sub.add_parser("unpack", help="a --full export back into a workdir that resumes")
    u.add_argument("directory")
    u.add_argument("--workdir", required=True, help="the new workdir to write")
    a = p.parse_args(argv)
    try:
        if a.command == "unpack":
            from vqvae.convert.unpack import unpack

            w = unpack(a.directory, a.workdir)
            print(f"{w}: resume with python train.py --config {w}/config.py --workdir {w}")
        elif a.command == "export":
            from vqvae.convert.export import export_original, export_safetensors, load_workdir

            if not (a.to or a.to_taming or a.to_llamagen):
                raise ConvertError("export needs --to DIR, --to-taming FILE or --to-llamagen FILE")
            loaded = load_workdir(a.workdir, a.step)
            if a.to:
                print(export_safetensors(a.workdir, a.to, a.step, a.full, loaded))
            if a.to_taming:
                print(export_original(a.workdir, a.to_taming, "taming", a.step, loaded))
            if a.to_llamagen:
                print(export_original(a.workdir, a.to_llamagen, "llamagen", a.step, loaded))
        else:
            print(convert(a.command, a.file, a.workdir, a.preset))
    except (ConvertError, FileNotFoundError, FileExistsError) as err:  # CheckpointError too
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
