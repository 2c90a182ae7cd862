# One QemuVM manifest, stored as the `input` of a terraform_data resource. The tofu-qemu state
# backend finds it in the state (kind = "QemuVM") and turns it into a VM object.
#
# Optional settings left null stay null in the manifest: the server drops nulls and applies its
# own defaults, so the defaults live in one place (api/types.py QemuVMSpec).

locals {
  boot = var.kernel == null ? null : {
    kernel  = var.kernel
    initrd  = var.initrd
    cmdline = var.cmdline
  }

  manifest = {
    apiVersion = "tofu-qemu.dev/v1alpha1"
    kind       = "QemuVM"
    metadata = {
      name   = var.name
      labels = var.labels
    }
    spec = {
      cpus        = var.cpus
      memory      = var.memory
      machine     = var.machine
      accel       = var.accel
      runStrategy = var.run_strategy
      boot        = local.boot
      disks = [
        for disk in var.disks : {
          name          = disk.name
          image         = disk.image
          sha256        = disk.sha256
          size          = disk.size
          reclaimPolicy = disk.reclaim_policy
        }
      ]
      network = {
        forwards = [
          for forward in var.forwards : {
            protocol  = forward.protocol
            guestPort = forward.guest_port
            hostPort  = forward.host_port
          }
        ]
      }
      cloudInit = var.cloud_init == null ? null : {
        userData          = var.cloud_init.user_data
        metaData          = var.cloud_init.meta_data
        networkConfig     = var.cloud_init.network_config
        sshAuthorizedKeys = var.cloud_init.ssh_authorized_keys
      }
      firmware = var.firmware == null ? null : {
        type          = var.firmware.type
        secureBoot    = var.firmware.secure_boot
        reclaimPolicy = var.firmware.reclaim_policy
      }
      tpm         = var.tpm == null ? null : { persistent = var.tpm.persistent }
      guestAgent  = var.guest_agent
      stopTimeout = var.stop_timeout
      # docs/instancetypes.md: cpus and memory from a type, defaults from a preference.
      instanceType = var.instance_type
      preference   = var.preference
    }
  }
}

resource "terraform_data" "vm" {
  input = local.manifest

  lifecycle {
    # Rules that span several variables (api/types.py QemuVMSpec and BootSpec validators).
    precondition {
      condition     = var.kernel != null || anytrue([for disk in var.disks : disk.image != null])
      error_message = "VM ${var.name}: nothing to boot: set kernel or give a disk an image."
    }
    precondition {
      condition     = var.kernel != null || (var.initrd == null && var.cmdline == null)
      error_message = "VM ${var.name}: initrd and cmdline need a kernel."
    }
  }
}
