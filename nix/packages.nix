# The workspace's binaries, built from the repository with its Cargo.lock. The guest programs
# are linked statically (they run in minimal guests without a C library).
{ lib, rustPlatform, pkg-config, cmake, protobuf, perl, src }:
let
  common = {
    version = "0.1.0";
    inherit src;
    cargoLock.lockFile = src + "/Cargo.lock";
    # Pingora builds zlib-ng with cmake; etcd-client compiles etcd's protobuf files.
    nativeBuildInputs = [ pkg-config cmake protobuf perl ];
    # The test suite boots guests inside a QEMU test host: not in the Nix sandbox.
    doCheck = false;
    meta = {
      homepage = "https://github.com/lightbyte/lightbyte";
      license = lib.licenses.asl20;
      platforms = [ "x86_64-linux" ];
    };
  };
  crate = pname: package: bins: rustPlatform.buildRustPackage (common // {
    inherit pname;
    cargoBuildFlags = [ "-p" package ] ++ lib.concatMap (b: [ "--bin" b ]) bins;
  });
in
{
  vmm = crate "vmm" "vmm" [ "vmm" ];
  lightbyte = crate "lightbyte" "lightbyte-orchestrator" [ "lightbyte" ];
  lightbyte-proxy = crate "lightbyte-proxy" "lightbyte-proxy" [ "lightbyte-proxy" ];
  guest-agent = (crate "lightbyte-guest-agent" "lightbyte-guest-agent" [ "lightbyte-guest-agent" ]).overrideAttrs (old: {
    RUSTFLAGS = "-C target-feature=+crt-static";
  });
}
