# Every rule below mirrors api/types.py, so a mistake fails at `plan` with a readable message
# instead of reaching the server as a VM with Valid=False. The server still validates
# everything: these checks are a convenience, not the authority.
#
# Terraform < 1.12 does not short-circuit `||`/`&&`, so checks on optional (nullable) values
# are guarded with `x == null ? true : ...` (only the chosen branch's errors count).

variable "name" {
  description = "metadata.name: an RFC 1123 label, unique within the project."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.name))
    error_message = "name ${jsonencode(var.name)} must be 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit."
  }
}

variable "labels" {
  description = "metadata.labels: Kubernetes-style labels ([prefix/]name = value)."
  type        = map(string)
  default     = {}
  nullable    = false

  validation {
    condition     = length(var.labels) <= 64
    error_message = "At most 64 labels are allowed."
  }
  validation {
    condition = alltrue([
      for key in keys(var.labels) :
      can(regex("^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$", key))
    ])
    error_message = "Label keys must be [prefix/]name: the optional prefix a DNS subdomain, the name 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit."
  }
  validation {
    condition = alltrue([
      for value in values(var.labels) :
      value == "" || can(regex("^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$", value))
    ])
    error_message = "Label values must be empty or 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit."
  }
}

variable "cpus" {
  description = "Virtual CPUs, 1-64. Null: the server default (1)."
  type        = number
  default     = null

  validation {
    condition     = var.cpus == null ? true : var.cpus == floor(var.cpus) && var.cpus >= 1 && var.cpus <= 64
    error_message = "cpus must be a whole number from 1 to 64."
  }
}

variable "memory" {
  description = "Memory: a number of MiB (512) or a quantity string (\"512Mi\", \"2Gi\"); 16 MiB to 1 TiB. Null: the server default (512)."
  type        = any
  default     = null

  validation {
    condition     = var.memory == null ? true : can(regex("^[0-9]{1,15}(Ki|Mi|Gi|Ti|K|M|G|T)?$", tostring(var.memory)))
    error_message = "memory ${jsonencode(var.memory)} must be a whole number of MiB (512) or a quantity string such as \"512Mi\" or \"2Gi\"."
  }
  validation {
    # The size in bytes (a bare number is MiB, like "Mi"). A value that cannot be computed must be
    # one the format rule above already reports; anything else fails here rather than passing.
    condition = var.memory == null ? true : try(alltrue(flatten([
      for parts in [regex("^([0-9]{1,15})(Ki|Mi|Gi|Ti|K|M|G|T)?$", tostring(var.memory))] : [
        for bytes in [tonumber(parts[0]) * {
          Ki = 1024, Mi = 1048576, Gi = 1073741824, Ti = 1099511627776,
          K  = 1000, M = 1000000, G = 1000000000, T = 1000000000000
        }[coalesce(parts[1], "Mi")]] :
        bytes % 1048576 == 0 && bytes >= 16 * 1048576 && bytes <= 1099511627776
      ]
    ])), !can(regex("^[0-9]{1,15}(Ki|Mi|Gi|Ti|K|M|G|T)?$", tostring(var.memory))))
    error_message = "memory ${jsonencode(var.memory)} must be a whole number of MiB from 16 MiB to 1 TiB (1048576 MiB)."
  }
}

variable "machine" {
  description = "QEMU machine type: q35 or microvm. Null: the server default (q35)."
  type        = string
  default     = null

  validation {
    condition     = var.machine == null ? true : contains(["q35", "microvm"], var.machine)
    error_message = "machine ${jsonencode(var.machine)} must be \"q35\" or \"microvm\"."
  }
}

variable "accel" {
  description = "Accelerator: auto (KVM when available, else TCG), kvm or tcg. Null: the server default (auto)."
  type        = string
  default     = null

  validation {
    condition     = var.accel == null ? true : contains(["auto", "kvm", "tcg"], var.accel)
    error_message = "accel ${jsonencode(var.accel)} must be \"auto\", \"kvm\" or \"tcg\"."
  }
}

variable "run_strategy" {
  description = "spec.runStrategy: Always, RerunOnFailure or Halted. Null: the server default (Always)."
  type        = string
  default     = null

  validation {
    condition     = var.run_strategy == null ? true : contains(["Always", "RerunOnFailure", "Halted"], var.run_strategy)
    error_message = "run_strategy ${jsonencode(var.run_strategy)} must be \"Always\", \"RerunOnFailure\" or \"Halted\" (case matters)."
  }
}

variable "kernel" {
  description = "boot.kernel: a file in the server's images dir, e.g. \"tiny-guest/vmlinuz\". Null: boot from a disk image."
  type        = string
  default     = null

  validation {
    condition     = var.kernel == null ? true : length(var.kernel) <= 255 && can(regex("^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$", var.kernel))
    error_message = "kernel ${jsonencode(var.kernel)} must be a relative path inside the images dir (at most 255 characters): letters, digits, '_', '.', '+', '-' and '/' between names; no '..', no leading '/', '.' or '-'."
  }
}

variable "initrd" {
  description = "boot.initrd: a file in the images dir. Needs kernel."
  type        = string
  default     = null

  validation {
    condition     = var.initrd == null ? true : length(var.initrd) <= 255 && can(regex("^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$", var.initrd))
    error_message = "initrd ${jsonencode(var.initrd)} must be a relative path inside the images dir (at most 255 characters): letters, digits, '_', '.', '+', '-' and '/' between names; no '..', no leading '/', '.' or '-'."
  }
}

variable "cmdline" {
  description = "boot.cmdline: the kernel command line, printable ASCII, at most 2048 characters. Needs kernel."
  type        = string
  default     = null

  validation {
    condition     = var.cmdline == null ? true : length(var.cmdline) <= 2048 && can(regex("^[ -~]*$", var.cmdline))
    error_message = "cmdline must be at most 2048 characters of printable ASCII (no newlines or control characters)."
  }
}

variable "disks" {
  description = <<-EOT
    Disks, at most 16. Each has a unique name (an RFC 1123 label) and an image (the base of a
    qcow2 overlay: a file in the images dir, "sha256:<hex>" from the download cache, or an
    http(s) URL verified by sha256 or by its "<url>.sha256" sidecar), a size (MiB as a number,
    or a quantity string such as "10Gi"), or both; reclaim_policy is Delete (default) or Retain.
  EOT
  type = list(object({
    name           = string
    image          = optional(string)
    sha256         = optional(string)
    size           = optional(string)
    reclaim_policy = optional(string)
  }))
  default  = []
  nullable = false

  validation {
    condition     = length(var.disks) <= 16
    error_message = "At most 16 disks are allowed."
  }
  validation {
    condition     = alltrue([for disk in var.disks : can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", disk.name))])
    error_message = "Disk names must be 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit."
  }
  validation {
    condition     = length(distinct([for disk in var.disks : disk.name])) == length(var.disks)
    error_message = "Disk names must be unique within the VM."
  }
  validation {
    condition = alltrue([
      for disk in var.disks :
      disk.image == null ? true : (
        can(regex("^https?://[^[:space:]@#]+$", disk.image)) ? length(disk.image) <= 2048 :
        can(regex("^sha256:", disk.image)) ? can(regex("^sha256:[0-9a-f]{64}$", disk.image)) :
        length(disk.image) <= 255 && can(regex("^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$", disk.image))
      )
    ])
    error_message = "Disk images must be a relative path inside the images dir (at most 255 characters: letters, digits, '_', '.', '+', '-' and '/' between names; no '..', no leading '/', '.' or '-'), sha256:<64 hex digits>, or an http(s) URL without credentials (at most 2048 characters)."
  }
  validation {
    condition = alltrue([
      for disk in var.disks :
      disk.sha256 == null ? true : can(regex("^(sha256:)?[0-9a-fA-F]{64}$", disk.sha256)) && can(regex("^https?://", coalesce(disk.image, "-")))
    ])
    error_message = "Disk sha256 must be 64 hex digits, and only URL images take one."
  }
  validation {
    condition     = alltrue([for disk in var.disks : disk.image != null || disk.size != null])
    error_message = "Each disk needs an image, a size, or both."
  }
  validation {
    condition = alltrue([
      for disk in var.disks :
      disk.size == null ? true : can(regex("^[0-9]{1,15}(Ki|Mi|Gi|Ti|K|M|G|T)?$", disk.size))
    ])
    error_message = "Disk sizes must be a whole number of MiB (10240) or a quantity string such as \"10Gi\"."
  }
  validation {
    # As for memory: a size that cannot be computed must be one the format rule above reports.
    condition = alltrue([
      for disk in var.disks : disk.size == null ? true : try(alltrue(flatten([
        for parts in [regex("^([0-9]{1,15})(Ki|Mi|Gi|Ti|K|M|G|T)?$", disk.size)] : [
          for bytes in [tonumber(parts[0]) * {
            Ki = 1024, Mi = 1048576, Gi = 1073741824, Ti = 1099511627776,
            K  = 1000, M = 1000000, G = 1000000000, T = 1000000000000
          }[coalesce(parts[1], "Mi")]] :
          bytes % 1048576 == 0 && bytes >= 1048576 && bytes <= 64 * 1099511627776
        ]
      ])), !can(regex("^[0-9]{1,15}(Ki|Mi|Gi|Ti|K|M|G|T)?$", disk.size)))
    ])
    error_message = "Disk sizes must be a whole number of MiB, from 1 MiB to 64 TiB."
  }
  validation {
    condition = alltrue([
      for disk in var.disks :
      disk.reclaim_policy == null ? true : contains(["Delete", "Retain"], disk.reclaim_policy)
    ])
    error_message = "Disk reclaim_policy must be \"Delete\" or \"Retain\" (case matters)."
  }
}

variable "forwards" {
  description = <<-EOT
    User-mode (SLIRP) port forwards, at most 32: protocol (tcp, the default, or udp), guest_port
    (1-65535) and host_port (1024-65535; omit it to let the server allocate one).
  EOT
  type = list(object({
    protocol   = optional(string)
    guest_port = number
    host_port  = optional(number)
  }))
  default  = []
  nullable = false

  validation {
    condition     = length(var.forwards) <= 32
    error_message = "At most 32 port forwards are allowed."
  }
  validation {
    condition = alltrue([
      for forward in var.forwards :
      forward.protocol == null ? true : contains(["tcp", "udp"], forward.protocol)
    ])
    error_message = "Forward protocols must be \"tcp\" or \"udp\"."
  }
  validation {
    condition = alltrue([
      for forward in var.forwards :
      forward.guest_port == floor(forward.guest_port) && forward.guest_port >= 1 && forward.guest_port <= 65535
    ])
    error_message = "Forward guest_port must be a whole number from 1 to 65535."
  }
  validation {
    condition = alltrue([
      for forward in var.forwards :
      forward.host_port == null ? true : forward.host_port == floor(forward.host_port) && forward.host_port >= 1024 && forward.host_port <= 65535
    ])
    error_message = "Forward host_port must be a whole number from 1024 to 65535 (unprivileged), or omitted to have one allocated."
  }
  validation {
    condition = length(distinct([
      for forward in var.forwards : "${coalesce(forward.protocol, "tcp")}/${forward.guest_port}"
    ])) == length(var.forwards)
    error_message = "Each protocol/guest_port may be forwarded only once."
  }
  validation {
    condition = length(distinct([
      for forward in var.forwards : "${coalesce(forward.protocol, "tcp")}/${forward.host_port}" if forward.host_port != null
    ])) == length([for forward in var.forwards : forward if forward.host_port != null])
    error_message = "Each protocol/host_port may be used only once."
  }
}

variable "stop_timeout" {
  description = "spec.stopTimeout: seconds (30) or a duration string (\"30s\", \"1m30s\"), at most 1h. Null: the server default (30 s)."
  type        = any
  default     = null

  validation {
    condition     = var.stop_timeout == null ? true : can(regex("^([0-9]{1,6}|([0-9]{1,6}[hms])+)$", tostring(var.stop_timeout)))
    error_message = "stop_timeout ${jsonencode(var.stop_timeout)} must be whole seconds (30) or a duration string such as \"30s\" or \"1m30s\"."
  }
  validation {
    # Seconds, summed over the "1h", "2m", "30s" parts (a bare number is seconds).
    condition = var.stop_timeout == null ? true : try(sum(concat([0], [
      for parts in regexall("([0-9]{1,6})([hms]?)", tostring(var.stop_timeout)) :
      tonumber(parts[0]) * { "" = 1, h = 3600, m = 60, s = 1 }[parts[1]]
    ])) <= 3600, !can(regex("^([0-9]{1,6}|([0-9]{1,6}[hms])+)$", tostring(var.stop_timeout))))
    error_message = "stop_timeout ${jsonencode(var.stop_timeout)} must be at most 1h (3600 seconds)."
  }
}

variable "cloud_init" {
  description = <<-EOT
    A cloud-init NoCloud seed, attached as a CD-ROM labelled cidata. user_data is text (a script,
    "#cloud-config" YAML) or an object (written as #cloud-config); meta_data adds meta-data keys
    (instance-id and local-hostname are set by the server); network_config is a version 1 or 2
    object; ssh_authorized_keys are OpenSSH public key lines for the default user. Null: no seed.
  EOT
  type = object({
    user_data           = optional(any)
    meta_data           = optional(map(any))
    network_config      = optional(any)
    ssh_authorized_keys = optional(list(string))
  })
  default = null

  validation {
    condition     = var.cloud_init == null ? true : length(coalesce(var.cloud_init.ssh_authorized_keys, [])) <= 32
    error_message = "At most 32 SSH keys are allowed."
  }
}

variable "instance_type" {
  description = "spec.instanceType: { name, kind }. The VM takes cpus and memory from it and may not set them. kind: QemuInstanceType (this project's, the default) or QemuClusterInstanceType (the server's)."
  type = object({
    name = string
    kind = optional(string)
  })
  default = null

  validation {
    condition     = var.instance_type == null ? true : can(regex("^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$", var.instance_type.name))
    error_message = "instance_type.name must be 1-63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit."
  }
  validation {
    condition     = var.instance_type == null ? true : contains(["QemuInstanceType", "QemuClusterInstanceType"], coalesce(var.instance_type.kind, "QemuInstanceType"))
    error_message = "instance_type.kind must be QemuInstanceType or QemuClusterInstanceType."
  }
  validation {
    condition     = var.instance_type == null ? true : var.cpus == null && var.memory == null
    error_message = "A VM with an instance_type may not set cpus or memory: the type sets them."
  }
}

variable "preference" {
  description = "spec.preference: { name, kind }. Defaults the VM's own settings override. kind: QemuPreference (this project's, the default) or QemuClusterPreference (the server's)."
  type = object({
    name = string
    kind = optional(string)
  })
  default = null

  validation {
    condition     = var.preference == null ? true : can(regex("^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$", var.preference.name))
    error_message = "preference.name must be 1-63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit."
  }
  validation {
    condition     = var.preference == null ? true : contains(["QemuPreference", "QemuClusterPreference"], coalesce(var.preference.kind, "QemuPreference"))
    error_message = "preference.kind must be QemuPreference or QemuClusterPreference."
  }
}

variable "firmware" {
  description = <<-EOT
    spec.firmware (docs/firmware.md): type "bios" (SeaBIOS) or "uefi" (OVMF with an NVRAM file of
    the VM's own); secure_boot (uefi on q35 only) boots OVMF with Microsoft's keys enrolled;
    reclaim_policy ("Delete"/"Retain") is what happens to the NVRAM when the VM is deleted.
    Null: bios.
  EOT
  type = object({
    type           = optional(string)
    secure_boot    = optional(bool)
    reclaim_policy = optional(string)
  })
  default = null

  validation {
    condition     = var.firmware == null ? true : contains(["bios", "uefi"], coalesce(var.firmware.type, "bios"))
    error_message = "firmware.type must be \"bios\" or \"uefi\"."
  }
}

variable "guest_agent" {
  description = "spec.guestAgent (docs/guest-agent.md): a qemu-ga channel; the guest's addresses in status, guest-shutdown before the power button."
  type        = bool
  default     = false
  nullable    = false
}

variable "tpm" {
  description = "spec.tpm: a TPM 2.0 from a per-VM swtpm (q35 only); persistent keeps its state across restarts. Null: no TPM."
  type = object({
    persistent = optional(bool)
  })
  default = null
}
