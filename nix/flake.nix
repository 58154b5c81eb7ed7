# lightbyte with Nix: packages for vmm, lightbyte (control plane, worker agent, CLI),
# lightbyte-proxy and the guest agent; a NixOS module for worker hosts; a guest image; and an
# example three-host cluster deployed with colmena. See README.md for what was (and was not)
# built on lightbyte's CI machines.
{
  description = "lightbyte: a KVM virtual machine monitor and the control plane that runs fleets of its VMs";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      lightbyte = pkgs.callPackage ./packages.nix { src = ../.; };
    in
    {
      packages.${system} = lightbyte // { default = lightbyte.lightbyte; };

      nixosModules.worker = import ./worker-module.nix { inherit lightbyte; };

      # A guest image: minimal NixOS with the guest agent (and the load-balancing proxy when
      # `lightbyte.guest.proxy = true`), as a raw disk for `lightbyte image push`.
      nixosConfigurations.guest = nixpkgs.lib.nixosSystem {
        inherit system;
        modules = [ (import ./guest-image.nix { inherit lightbyte; }) ];
      };

      # `colmena apply` over three hosts: etcd and the control plane on the first, a worker
      # agent on each.
      colmena = import ./deploy/colmena.nix { inherit nixpkgs lightbyte; workerModule = self.nixosModules.worker; };
    };
}
