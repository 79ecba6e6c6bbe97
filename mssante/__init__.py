"""mssante: the patient side of MSSanté secure health messaging."""
