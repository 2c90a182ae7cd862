# A QemuInstanceType (cpus, memory) or a QemuPreference (defaults) of this project, stored as
# the `input` of a terraform_data resource like a QemuVM (docs/instancetypes.md). VMs reference
# it by name: module "qemu-vm" { instance_type = { name = "small" } }.
#
# A change of it restarts no VM: each VM keeps the revision it took until `tofu-qemu rollout`
# or a change of its own spec.

terraform {
  required_version = ">= 1.6.0"
}

variable "name" {
  description = "metadata.name: 1-63 lowercase letters, digits, '-' and '.' (\"small\", \"u2.large\")."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$", var.name))
    error_message = "name ${jsonencode(var.name)} must be 1-63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit."
  }
}

variable "kind" {
  description = "QemuInstanceType (cpus and memory, required) or QemuPreference (defaults)."
  type        = string
  default     = "QemuInstanceType"

  validation {
    condition     = contains(["QemuInstanceType", "QemuPreference"], var.kind)
    error_message = "kind must be QemuInstanceType or QemuPreference."
  }
}

variable "labels" {
  description = "metadata.labels."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "spec" {
  description = "QemuInstanceType: { cpus, memory }. QemuPreference: any of { machine, accel, runStrategy, stopTimeout, cloudInit }."
  type        = any
  nullable    = false

  validation {
    condition     = var.kind != "QemuInstanceType" ? true : try(var.spec.cpus != null && var.spec.memory != null, false)
    error_message = "A QemuInstanceType sets both cpus and memory."
  }
}

resource "terraform_data" "type" {
  input = {
    apiVersion = "tofu-qemu.dev/v1alpha1"
    kind       = var.kind
    metadata   = { name = var.name, labels = var.labels }
    spec       = var.spec
  }
}

output "name" {
  description = "The name VMs reference."
  value       = var.name
}
